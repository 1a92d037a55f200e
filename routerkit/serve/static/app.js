// The page of `routerkit serve`: choose or drop an image, POST it to v1/predict?format=page, show the answer.
// No build step and no dependency. `/?demo=1` routes a synthetic scan as soon as the page has loaded.
"use strict";

const $ = (id) => document.getElementById(id);
const TYPES = { png: "image/png", tif: "image/tiff", tiff: "image/tiff", jpg: "image/jpeg", jpeg: "image/jpeg", npy: "application/x-npy" };
let info = null;

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function fmt(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  return abs >= 0.01 ? value.toPrecision(3) : value.toExponential(2);
}

function legend(list, names, colours) {
  list.replaceChildren();
  names.forEach((name, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colours[i];
    item.append(swatch, document.createTextNode(name));
    list.append(item);
  });
}

async function loadInfo() {
  const response = await fetch("v1/info");
  if (!response.ok) throw new Error(`GET v1/info answered ${response.status}`);
  info = await response.json();
  const shape = info.input_shape.join(" x ");
  const source = info.source && info.source.run_dir ? `${info.source.run_dir} · ` : "";
  $("run-info").textContent = `${source}${info.task}, input ${shape}, ${info.num_units} unit(s) per window, models: ${info.model_names.join(", ")}`;
  $("convention").textContent = `GFLOPs count every pass that ran (${info.flop_convention}). routerkit ${info.routerkit_version}.`;
  $("largest-name").textContent = `always ${info.largest_model}`;
  legend($("legend-models"), info.model_names, info.model_colours);
  legend($("legend-classes"), info.class_names, info.class_colours);
}

function typeOf(file) {
  if (file.type && file.type !== "application/octet-stream") return file.type;
  const suffix = (file.name || "").split(".").pop().toLowerCase();
  return TYPES[suffix] || "application/octet-stream";
}

async function route(blob, name) {
  setStatus("busy", `Routing ${name}…`);
  let response;
  try {
    response = await fetch("v1/predict?format=page", { method: "POST", headers: { "Content-Type": typeOf(blob) }, body: blob });
  } catch (err) {
    setStatus("error", `Could not reach the server: ${err}`);
    return;
  }
  const answer = await response.json().catch(() => null);
  if (!response.ok || answer === null) {
    const error = answer && answer.error ? answer.error : { message: `HTTP ${response.status}`, expected: null };
    setStatus("error", `${error.message}${error.expected ? ` Expected: ${error.expected}.` : ""}`);
    return;
  }
  show(answer, name);
  setStatus("done", `Routed ${name} in ${answer.latency_ms.toFixed(1)} ms (${answer.windows} window(s), batched with ${answer.batch_inputs - 1} other input(s)).`);
}

function showImage(id, figure, uri) {
  const img = $(id);
  if (uri) {
    img.src = uri;
    if (figure) $(figure).hidden = false;
  } else if (figure) {
    $(figure).hidden = true;
  }
}

function show(answer, name) {
  const images = answer.images || {};
  showImage("img-input", null, images.input);
  showImage("img-uncertainty", "fig-uncertainty", images.uncertainty);
  showImage("img-routing", "fig-routing", images.routing);
  showImage("img-mask", "fig-mask", images.mask);
  if (answer.uncertainty_range) {
    $("cap-uncertainty").textContent = `f_0's uncertainty (0 to ${answer.uncertainty_range[1].toFixed(2)} nats)`;
  }
  const label = $("label");
  if (answer.class_name !== undefined) {
    label.hidden = false;
    const unc = answer.uncertainty !== undefined ? `, f_0's uncertainty ${answer.uncertainty.toFixed(3)}` : "";
    label.textContent = `${answer.class_name} (class ${answer.label}), answered by ${answer.model}${unc}`;
  } else {
    label.hidden = true;
  }
  const largest = answer.gflops_largest;
  const top = Math.max(answer.gflops, largest) || 1;
  $("bar-routed").style.width = `${(100 * answer.gflops) / top}%`;
  $("bar-largest").style.width = `${(100 * largest) / top}%`;
  $("gflops-routed").textContent = `${fmt(answer.gflops)} GFLOPs`;
  $("gflops-largest").textContent = `${fmt(largest)} GFLOPs`;
  const saved = 100 * answer.gflops_saved;
  $("gflops-summary").textContent = saved >= 0
    ? `Routing saved ${saved.toFixed(1)}% of the GFLOPs of ${answer.largest_model} alone.`
    : `Routing cost ${(-saved).toFixed(1)}% more than ${answer.largest_model} alone (f_0's state and the router are paid on top).`;
  const rows = $("usage").querySelector("tbody");
  rows.replaceChildren();
  Object.entries(answer.usage).forEach(([model, share], i) => {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = info ? info.model_colours[i] : "#999";
    cell.append(swatch, document.createTextNode(model));
    const value = document.createElement("td");
    value.textContent = `${(100 * share).toFixed(1)}%`;
    row.append(cell, value);
    rows.append(row);
  });
  const shape = answer.shape ? `${answer.shape.join(" x ")} · ` : "";
  $("details").textContent = `${name}: ${shape}${answer.actions.length} unit decision(s)`;
  $("result").hidden = false;
}

// A synthetic scan of the trained size: grains of two phases on a background, with noise (seeded, so every demo is the same).
function demoBlob() {
  const shape = info.input_shape;
  if (shape.length !== 3) return Promise.reject(new Error("the demo draws images; this run takes vectors"));
  const [height, width] = [shape[1], shape[2]];
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  let seed = 7;
  const rand = () => {
    seed = (seed * 1664525 + 1013904223) % 4294967296;
    return seed / 4294967296;
  };
  ctx.fillStyle = "rgb(40,40,40)";
  ctx.fillRect(0, 0, width, height);
  const grains = Math.max(6, Math.round((width * height) / 90));
  for (let i = 0; i < grains; i++) {
    const level = rand() < 0.6 ? 200 : 125;
    ctx.fillStyle = `rgb(${level},${level},${level})`;
    ctx.beginPath();
    ctx.arc(rand() * width, rand() * height, 1.5 + rand() * Math.min(width, height) / 8, 0, 2 * Math.PI);
    ctx.fill();
  }
  const image = ctx.getImageData(0, 0, width, height);
  for (let p = 0; p < image.data.length; p += 4) {
    const v = Math.max(0, Math.min(255, image.data[p] + (rand() - 0.5) * 30));
    image.data[p] = image.data[p + 1] = image.data[p + 2] = v;
    image.data[p + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return new Promise((resolve, reject) => canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("canvas.toBlob failed"))), "image/png"));
}

async function demo() {
  try {
    const blob = await demoBlob();
    await route(blob, "synthetic scan");
  } catch (err) {
    setStatus("error", `Demo failed: ${err.message}`);
  }
}

function wire() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) route(file, file.name);
  });
  $("demo").addEventListener("click", demo);
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) route(file, file.name);
  });
}

window.addEventListener("DOMContentLoaded", async () => {
  wire();
  try {
    await loadInfo();
  } catch (err) {
    setStatus("error", `Could not load the run's info: ${err.message}`);
    return;
  }
  if (new URLSearchParams(window.location.search).get("demo") === "1") demo();
});
