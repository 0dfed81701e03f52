"""Deployment: the Python-free op library, AOTInductor packages run from Python and from the C++
example (examples/cpp, built here with CMake against the libtorch inside the torch wheel), their
errors on bad input, and the wheel installed into a fresh virtualenv."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_kernels as lk

ROOT = Path(__file__).resolve().parents[1]
C, H, W = 3, 12, 12  # input channels and size of the test model


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        lk.SepConv2d(C, 8, 3, rank=4, padding=1),
        nn.ReLU(),
        lk.SepConv2d(8, 4, 3, rank=2, padding=1, bias=False),
    ).eval()


def _tolerance(dtype: torch.dtype) -> float:
    # Different summation orders of two stacked convolutions: a few ulps per term of the longest
    # dot product (8 channels x 3 taps in the second layer, 3 x 3 in the first).
    return 16 * torch.finfo(dtype).eps * (8 * 3 + C * 3)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = _tolerance(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _cmake() -> str:
    # The cmake package from PyPI (test extra) installs next to this Python; else the system one.
    for candidate in (Path(sys.executable).parent / "cmake", shutil.which("cmake")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise AssertionError("cmake not found: pip install cmake (declared in the test extra)")


# ---------------------------------------------------------------------------------------------
# The op library


def test_ops_library_needs_no_python():
    path = Path(lk.ops_library_path())
    assert path.is_file() and path.parent.name == "lib"
    assert torch.ops.lowrank.sep_conv.default is not None
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic)
    assert "libtorch_cpu.so" in needed
    assert not [n for n in needed if "python" in n], needed
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [s for s in undefined if s.startswith(("Py", "_Py"))]


def test_cmake_config_is_in_the_package():
    config = Path(lk.cmake_prefix_path) / "LowrankKernels" / "LowrankKernelsConfig.cmake"
    assert config.is_file()
    assert "LowrankKernels::lowrank_ops" in config.read_text()


# ---------------------------------------------------------------------------------------------
# AOTInductor packages from Python


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    model = _tiny_model()
    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    assert lk.export_aoti(model, torch.randn(2, C, H, W), path, dynamic_batch=True) == str(path)
    return model, path


def test_export_aoti_records_inputs_and_ops(package):
    _, path = package
    meta = lk.load_aoti(path).metadata
    assert meta["lowrank.ops"] == "lowrank::sep_conv"
    assert meta["lowrank.input0.shape"] == f"-1,{C},{H},{W}"
    assert meta["lowrank.input0.dtype"] == "float32"


@pytest.mark.parametrize("batch", [1, 5])
def test_load_aoti_matches_eager(package, batch):
    model, path = package
    x = torch.randn(batch, C, H, W)
    with torch.no_grad():
        _assert_close(lk.load_aoti(path)(x), model(x))


def test_export_aoti_bad_arguments(tmp_path):
    model = _tiny_model()
    with pytest.raises(ValueError, match="path"):
        lk.export_aoti(model, torch.randn(2, C, H, W), tmp_path / "model.so")
    with pytest.raises(ValueError, match="example_inputs.*batch"):
        lk.export_aoti(model, torch.randn(1, C, H, W), tmp_path / "model.pt2")
    with pytest.raises(ValueError, match="example_inputs"):
        lk.export_aoti(model, [], tmp_path / "model.pt2")
    with pytest.raises(ValueError, match="model"):
        lk.export_aoti(lambda x: x, torch.randn(2, C, H, W), tmp_path / "model.pt2")


def test_load_aoti_bad_input(package, tmp_path):
    _, path = package
    text = tmp_path / "notes.pt2"
    text.write_text("not a package")
    with pytest.raises(ValueError, match="not an AOTInductor package"):
        lk.load_aoti(text)
    with pytest.raises(ValueError, match="does not exist"):
        lk.load_aoti(tmp_path / "missing.pt2")
    saved = tmp_path / "tensor.pt2"
    torch.save(torch.zeros(2), saved)  # a zip archive, but no package inside
    with pytest.raises(ValueError, match="could not be loaded"):
        lk.load_aoti(saved)
    model = lk.load_aoti(path)
    with pytest.raises(ValueError, match=r"inputs\[0\].*float32 \[batch, 3, 12, 12\]"):
        model(torch.randn(2, C + 1, H, W))
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        model(torch.randn(2, C, H, W, dtype=torch.float64))
    with pytest.raises(ValueError, match="1 input"):
        model(torch.randn(2, C, H, W), torch.randn(2, C, H, W))


def test_package_without_op_library_says_which_op(package):
    # A Python process that never loaded the op library (only torch): the loader names the op.
    _, path = package
    code = f"import torch; torch._inductor.aoti_load_package({str(path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=path.parent)
    assert run.returncode == 1
    assert "lowrank::sep_conv" in run.stderr


# ---------------------------------------------------------------------------------------------
# The C++ example


@pytest.fixture(scope="module")
def cpp_example(tmp_path_factory):
    build = tmp_path_factory.mktemp("cpp-build")
    prefix = f"{torch.utils.cmake_prefix_path};{lk.cmake_prefix_path}"
    cmake = _cmake()
    configure = [cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"]
    for cmd in (configure + ["-DCMAKE_BUILD_TYPE=Release"], [cmake, "--build", str(build), "-j", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if torch.version.cuda and "uses CUDA but I cannot find the CUDA" in result.stderr:
            pytest.skip(f"torch {torch.__version__} is a CUDA build: find_package(Torch) needs the CUDA toolkit")
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return build


def _run_cpp(program: Path, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {result.stderr}"
    return result


@pytest.mark.parametrize("program", ["lowrank_aoti_run", "lowrank_aoti_run_dlopen"])
def test_cpp_example_matches_python(package, cpp_example, tmp_path, program):
    model, path = package
    x = torch.randn(3, C, H, W)
    torch.save(x, tmp_path / "input.pt")
    extra = ["--ops-library", lk.ops_library_path()] if program.endswith("dlopen") else []
    run = _run_cpp(cpp_example / program, path, tmp_path / "input.pt", tmp_path / "output.pt", *extra)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        _assert_close(torch.load(tmp_path / "output.pt"), model(x))


def test_cpp_example_without_op_library(package, cpp_example, tmp_path):
    _, path = package
    torch.save(torch.randn(2, C, H, W), tmp_path / "input.pt")
    run = _run_cpp(cpp_example / "lowrank_aoti_run_dlopen", path, tmp_path / "input.pt", tmp_path / "out.pt")
    assert run.returncode == 1
    assert "lowrank::sep_conv" in run.stderr and "ops_library_path" in run.stderr
    run = _run_cpp(
        cpp_example / "lowrank_aoti_run_dlopen",
        *(path, tmp_path / "input.pt", tmp_path / "out.pt", "--ops-library", tmp_path / "missing.so"),
    )
    assert run.returncode == 1 and "--ops-library" in run.stderr
    assert not (tmp_path / "out.pt").exists()


def test_cpp_example_not_a_package(package, cpp_example, tmp_path):
    _, path = package
    torch.save(torch.randn(2, C, H, W), tmp_path / "input.pt")
    (tmp_path / "notes.pt2").write_text("not a package")
    program = cpp_example / "lowrank_aoti_run"
    for bad, message in [
        (tmp_path / "notes.pt2", "not an AOTInductor package"),
        (tmp_path / "input.pt", "not a readable AOTInductor package"),
        (tmp_path / "missing.pt2", "cannot be opened"),
    ]:
        run = _run_cpp(program, bad, tmp_path / "input.pt", tmp_path / "out.pt")
        assert run.returncode == 1 and message in run.stderr, run.stderr
        assert "frame #" not in run.stderr  # a message, not a stack trace
    run = _run_cpp(program, path, path, tmp_path / "out.pt")  # the package given as the input
    assert run.returncode == 1 and "not a tensor saved with torch.save" in run.stderr
    assert _run_cpp(program, path).returncode == 2


@pytest.mark.parametrize(
    "shape, dtype",
    [((2, C + 1, H, W), torch.float32), ((2, C, H + 1, W), torch.float32), ((C, H, W), torch.float32),
     ((0, C, H, W), torch.float32), ((2, C, H, W), torch.float64)],
)  # fmt: skip
def test_cpp_example_wrong_input(package, cpp_example, tmp_path, shape, dtype):
    _, path = package
    torch.save(torch.randn(shape, dtype=dtype), tmp_path / "input.pt")
    run = _run_cpp(cpp_example / "lowrank_aoti_run", path, tmp_path / "input.pt", tmp_path / "out.pt")
    assert run.returncode == 1
    assert f"the package was compiled for float32 [batch, {C}, {H}, {W}]" in run.stderr, run.stderr
    assert not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------------------------------------
# make gpu-check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop without a GPU")
def test_gpu_check_stops_without_a_gpu(tmp_path):
    out = tmp_path / "gpu-check-out"
    run = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert run.returncode == 2
    assert "gpu-check: no CUDA device" in run.stderr
    assert not out.exists()  # stopped before building or writing anything


# ---------------------------------------------------------------------------------------------
# The wheel in a fresh virtualenv


def _source_copy(dest: Path) -> Path:
    """The tracked files of the source tree (what a fresh clone has), without build outputs."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT and listed.returncode == 0:
        for name in filter(None, listed.stdout.split("\0")):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # not a git checkout
        ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.so", "__pycache__", "*.egg-info")
        shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)
    return dest


def _link_distribution(name: str, site: Path, seen: set[str]) -> None:
    """Make `name` and what it requires importable in `site` by linking this environment's copies
    (a virtualenv with the same packages installed, without a download)."""
    from packaging.requirements import Requirement

    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    seen.add(key)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return  # an optional requirement not installed here
    for top in {Path(f).parts[0] for f in dist.files or []}:
        if top in ("..", "__pycache__") or top.endswith(".pth"):
            continue
        target = Path(dist.locate_file(top))
        if target.exists() and not (site / top).exists():
            (site / top).symlink_to(target)
    for requirement in dist.requires or []:
        req = Requirement(requirement)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _link_distribution(req.name, site, seen)


def _fresh_venv(path: Path, packages: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    seen: set[str] = set()
    for name in packages:
        _link_distribution(name, site, seen)
    return python


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    src = _source_copy(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWRANK_")}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist")]
        + [str(src)],
        capture_output=True,
        text=True,
        env={**env, "LOWRANK_CPU_ARCH": "generic"},
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "-march=native" not in build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("lowrank_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lowrank_kernels/lib/liblowrank_ops.so" in names
    assert "lowrank_kernels/share/cmake/LowrankKernels/LowrankKernelsConfig.cmake" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))], names
    assert not [n for n in names if n.endswith((".json", ".png", ".pt2", ".pt"))], names
    assert not [n for n in names if re.search(r"\.cpython-.*\.so$", n)], names  # no Python extension

    # A virtualenv holding torch and numpy (and what they require) and nothing else.
    python = _fresh_venv(tmp_path / "venv", ["torch", "numpy"])
    torch_before = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    assert "Uninstalling torch" not in install.stdout  # the user's torch stays

    check = f"""
import torch, lowrank_kernels as lk
from lowrank_kernels import _reference as ref
assert torch.__version__ == {torch.__version__!r}, torch.__version__
assert lk.__file__.startswith({str(tmp_path / "venv")!r}), lk.__file__
assert lk.ops_library_path().startswith({str(tmp_path / "venv")!r})
torch.manual_seed(0)
x, wv, wh, b = torch.randn(2, 4, 9, 9), torch.randn(3, 4, 3, 1), torch.randn(5, 3, 1, 3), torch.randn(5)
torch.testing.assert_close(lk.sep_conv(x, wv, wh, b, padding=1), ref.sep_conv_reference(x, wv, wh, b, padding=(1, 1)))
A = torch.randn(6, 5, 4, dtype=torch.float64)
U, S, Vh = lk.batched_svd(A)
torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, A)
tau = torch.rand(6, 4, dtype=torch.float64)
torch.testing.assert_close(lk.householder_product(A, tau), ref.householder_product_reference(A, tau))
print("ok")
"""
    run = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    torch_after = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True)
    assert torch_before.stdout == torch_after.stdout
    assert (Path(sysconfig.get_path("purelib", vars={"base": str(tmp_path / "venv")})) / "torch").is_symlink()
