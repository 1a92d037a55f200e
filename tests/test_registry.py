"""Tests of routerkit._registry: names, dotted paths, classes, instances and friendly errors."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest

from routerkit._registry import Registry, RegistryError, import_object
from routerkit.models import ToySegmenter, create_model
from routerkit.routers import SingleModelRouter, create_router


class Thing:
    def __init__(self, size: int = 1) -> None:
        self.size = size


class OtherThing(Thing):
    pass


@pytest.fixture
def registry() -> Registry[Thing]:
    reg: Registry[Thing] = Registry("thing", Thing)
    reg.register("small_thing")(Thing)
    reg.register("other_thing")(OtherThing)
    return reg


def test_register_and_names(registry: Registry[Thing]) -> None:
    assert registry.names() == ["other_thing", "small_thing"]
    assert registry.names("small*") == ["small_thing"]
    assert "small_thing" in registry
    assert "nope" not in registry
    assert registry.get("small_thing") is Thing


def test_register_decorator_returns_object() -> None:
    reg: Registry[Thing] = Registry("thing")

    @reg.register("deco")
    class Deco(Thing):
        pass

    assert reg.get("deco") is Deco


@pytest.mark.parametrize("bad", ["", None, 3])
def test_register_rejects_bad_names(bad: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("thing").register(bad)  # type: ignore[arg-type]


def test_create_by_name_with_kwargs(registry: Registry[Thing]) -> None:
    obj = registry.create("small_thing", size=5)
    assert type(obj) is Thing and obj.size == 5


def test_create_bad_kwargs_names_component(registry: Registry[Thing]) -> None:
    with pytest.raises(TypeError, match=r"Could not build thing 'small_thing'.*colour"):
        registry.create("small_thing", colour="red")


def test_resolve_name_class_instance(registry: Registry[Thing]) -> None:
    assert registry.resolve("other_thing", size=2).size == 2
    by_class = registry.resolve(OtherThing, size=3)
    assert isinstance(by_class, OtherThing) and by_class.size == 3
    inst = Thing(7)
    assert registry.resolve(inst) is inst
    assert registry.resolve(lambda size: OtherThing(size * 2), size=4).size == 8


def test_resolve_instance_with_kwargs_raises(registry: Registry[Thing]) -> None:
    with pytest.raises(ValueError, match="ready thing instance"):
        registry.resolve(Thing(), size=3)


def test_resolve_wrong_type_raises(registry: Registry[Thing]) -> None:
    with pytest.raises(TypeError, match="Expected a thing name, class or instance of Thing but got int"):
        registry.resolve(42)


def test_resolve_dotted_path(registry: Registry[Thing]) -> None:
    obj = registry.resolve(f"{__name__}:OtherThing", size=9)
    assert isinstance(obj, OtherThing) and obj.size == 9


def test_dotted_path_to_user_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "rk_user_plugin.py").write_text(
        textwrap.dedent(
            """
            from routerkit.models import ToySegmenter

            def build(width=3):
                return ToySegmenter(width=width)

            class Holder:
                class Inner:
                    value = 11
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = create_model("rk_user_plugin:build", width=5)
        assert isinstance(model, ToySegmenter)
        assert model.net[0].out_channels == 5
        assert import_object("rk_user_plugin:Holder.Inner").value == 11
        assert import_object("rk_user_plugin.build").__name__ == "build"
    finally:
        sys.modules.pop("rk_user_plugin", None)


def test_import_object_errors() -> None:
    with pytest.raises(ImportError, match="dotted path"):
        import_object("nodots")
    with pytest.raises(ImportError, match="Could not import module 'no_such_module_xyz'"):
        import_object("no_such_module_xyz:thing")
    with pytest.raises(ImportError, match="has no attribute 'missing'"):
        import_object("routerkit.models:missing")


def test_unknown_name_lists_valid_names_and_suggests(registry: Registry[Thing]) -> None:
    with pytest.raises(RegistryError) as info:
        registry.create("smal_thing")
    message = str(info.value)
    assert "Unknown thing 'smal_thing'" in message
    assert "Did you mean 'small_thing'" in message
    assert "Valid names: other_thing, small_thing" in message
    assert isinstance(info.value, KeyError)
    assert not message.startswith('"')  # plain message, not KeyError's repr


def test_unknown_name_without_close_match(registry: Registry[Thing]) -> None:
    with pytest.raises(RegistryError) as info:
        registry.get("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Valid names: other_thing, small_thing" in str(info.value)


def test_empty_registry_error() -> None:
    with pytest.raises(RegistryError, match=r"\(none\)"):
        Registry("thing").get("x")


def test_overwriting_warns(registry: Registry[Thing]) -> None:
    with pytest.warns(UserWarning, match="Overwriting thing 'small_thing'"):
        registry.register("small_thing")(OtherThing)
    assert registry.get("small_thing") is OtherThing


def test_reregistering_same_object_is_silent(registry: Registry[Thing]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.register("small_thing")(Thing)


def test_library_registries_resolve_all_forms() -> None:
    assert isinstance(create_model("toy_segmenter", width=2), ToySegmenter)
    assert isinstance(create_model(ToySegmenter, width=2), ToySegmenter)
    seg = ToySegmenter()
    assert create_model(seg) is seg
    assert isinstance(create_model("routerkit.models:ToySegmenter"), ToySegmenter)
    router = create_router("single", num_actions=3, index=2)
    assert isinstance(router, SingleModelRouter) and router.index == 2
    with pytest.raises(RegistryError, match="Did you mean 'toy_segmenter'"):
        create_model("toy_segmentr")
