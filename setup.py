"""Generates the gRPC/protobuf stubs from protos/ whenever the package is built
or installed (editable installs included); the generated code is never committed."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def generate_protos(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(map(str, protos)))
    for package_dir in {p.parent.relative_to(ROOT / "protos") for p in protos}:
        init = out_dir / package_dir / "__init__.py"
        init.write_text('"""Generated from protos/; do not edit."""\n')


class BuildPyWithProtos(build_py):
    def run(self):
        # Editable installs import from the source tree, wheels from build_lib.
        generate_protos(ROOT)
        if not self.editable_mode:
            # packages were listed before the stubs existed
            self.packages = sorted(set(self.packages or []) | {"airan.v1"})
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
