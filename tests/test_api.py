import importlib
import pkgutil

import mps_autobatch


def test_the_package_exports_what_its_modules_declare():
    for name in mps_autobatch.__all__:
        assert hasattr(mps_autobatch, name)
    for info in pkgutil.iter_modules(mps_autobatch.__path__):
        if info.name == "__main__":  # the `python -m mps_autobatch` entry point runs the CLI on import
            continue
        module = importlib.import_module(f"mps_autobatch.{info.name}")
        assert isinstance(module.__all__, list), info.name
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.{name}"
        for name in mps_autobatch.__all__:
            if name in module.__all__:
                assert getattr(mps_autobatch, name) is getattr(module, name)
