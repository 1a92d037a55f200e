"""``python -m routerkit`` is the ``routerkit`` command (torchrun starts ranks this way: ``torchrun -m routerkit train``)."""

from routerkit.cli import app

if __name__ == "__main__":
    app()
