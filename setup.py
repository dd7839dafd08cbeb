"""Build script for ncclep.

The CUDA extension ``ncclep._C`` is built only where it can be: torch with CUDA
and nvcc in the build environment (so use ``pip install --no-build-isolation``),
or when forced with ``NCCLEP_BUILD_CUDA=1``. ``NCCLEP_BUILD_CUDA=0``, a missing
torch, a CPU-only torch or a missing nvcc give a pure-Python install.

Environment:
  NCCLEP_BUILD_CUDA      1 = force the extension, 0 = never build it
  NCCL_HOME              NCCL with include/nccl.h and lib/libnccl.so.2; default: the NCCL
                         torch loads (the nvidia-nccl-cu13 / -cu12 wheel)
  CUDA_HOME / CUDA_PATH  CUDA toolkit; default: /usr/local/cuda, else from nvcc on PATH
  TORCH_CUDA_ARCH_LIST   e.g. "9.0" or "9.0;10.0+PTX"; default: sm_90
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
MIN_NCCL = (2, 28, 7)  # the NCCL Device API with GIN (csrc/core/nccl_compat.h has the differences)

# Commands that only need metadata: no torch import, no extension.
_METADATA_ONLY = {
    "--version",
    "--name",
    "--fullname",
    "--author",
    "--help",
    "-h",
    "--help-commands",
    "egg_info",
    "dist_info",
    "sdist",
    "clean",
    "check",
}


def _log(msg):
    print(f"ncclep setup: {msg}", file=sys.stderr)


def _fail(msg):
    raise SystemExit(f"ncclep setup: error: {msg}")


def _cuda_toolkit_ok(path):
    return bool(path) and os.path.exists(os.path.join(path, "include", "cuda_runtime_api.h"))


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if not _cuda_toolkit_ok(path):
                _fail(f"{var}={path} has no include/cuda_runtime_api.h")
            return path
    if _cuda_toolkit_ok("/usr/local/cuda"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a wrapper script; only trust a directory that looks like a toolkit.
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _cuda_toolkit_ok(home):
            return home
    return None


def _nvcc_of(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    return nvcc if nvcc and os.access(nvcc, os.X_OK) else None


def _want_extension():
    """(build?, reason). Imports torch only here."""
    force = os.environ.get("NCCLEP_BUILD_CUDA", "").strip()
    if force not in ("", "0", "1"):
        _fail(f"NCCLEP_BUILD_CUDA must be 0 or 1, got {force!r}")
    if force == "0":
        return False, "NCCLEP_BUILD_CUDA=0"
    try:
        import torch
    except ImportError:
        if force == "1":
            _fail(
                "NCCLEP_BUILD_CUDA=1 but torch cannot be imported in the build environment "
                "(install torch first and use `pip install --no-build-isolation`)"
            )
        return False, "torch is not importable in the build environment"
    cuda_home = _find_cuda_home()
    if force == "1":
        if _nvcc_of(cuda_home) is None:
            _fail("NCCLEP_BUILD_CUDA=1 but no CUDA toolkit with bin/nvcc was found (set CUDA_HOME)")
        return True, "NCCLEP_BUILD_CUDA=1"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if _nvcc_of(cuda_home) is None:
        return False, "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA toolkit at {cuda_home}"


def _nccl_header_version(include_dir):
    text = open(os.path.join(include_dir, "nccl.h")).read()
    major = re.search(r"#define\s+NCCL_MAJOR\s+(\d+)", text)
    minor = re.search(r"#define\s+NCCL_MINOR\s+(\d+)", text)
    patch = re.search(r"#define\s+NCCL_PATCH\s+(\d+)", text)
    if not (major and minor):
        return None
    return int(major.group(1)), int(minor.group(1)), int(patch.group(1)) if patch else 0


def _nccl_lib_dir(root):
    for sub in ("lib", "lib64"):
        d = os.path.join(root, sub)
        if glob.glob(os.path.join(d, "libnccl.so*")):
            return d
    return None


def _nccl_loaded_by_torch():
    """Root of the libnccl that `import torch` mapped into this process, if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "/libnccl.so" in path and os.path.exists(path):
                    return os.path.dirname(os.path.dirname(os.path.realpath(path)))
    except OSError:
        pass
    return None


def _find_nccl():
    """(include_dir, lib_dir, where)."""
    candidates = []
    home = os.environ.get("NCCL_HOME")
    if home:
        candidates.append((home, f"NCCL_HOME={home}"))
    else:
        loaded = _nccl_loaded_by_torch()
        if loaded:
            candidates.append((loaded, "the libnccl loaded by torch"))
        try:
            import nvidia.nccl

            for path in list(nvidia.nccl.__path__):
                candidates.append((path, "the nvidia.nccl wheel"))
        except ImportError:
            pass
    for root, where in candidates:
        include_dir, lib_dir = os.path.join(root, "include"), _nccl_lib_dir(root)
        if os.path.exists(os.path.join(include_dir, "nccl.h")) and lib_dir:
            return include_dir, lib_dir, where
        if home:
            _fail(f"NCCL_HOME={home} needs include/nccl.h and lib/libnccl.so.2")
    _fail(
        "cannot find NCCL: set NCCL_HOME to a directory with include/nccl.h and lib/libnccl.so.2, "
        "or install the NCCL wheel that matches torch (nvidia-nccl-cu13 for CUDA 13 torch, "
        "nvidia-nccl-cu12 for CUDA 12 torch)"
    )


def _arch_flags():
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch_list:
        return ["-gencode=arch=compute_90,code=sm_90"]
    flags = []
    for entry in re.split(r"[;\s]+", arch_list):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        arch = entry[:-4] if ptx else entry
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not m:
            _fail(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form 9.0, 9.0a or 9.0+PTX")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _sources():
    csrc = os.path.join(ROOT, "csrc")
    found = glob.glob(os.path.join(csrc, "**", "*.cc"), recursive=True)
    found += glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _extension_config():
    """(ext_modules, cmdclass) for this build."""
    if any(arg in _METADATA_ONLY for arg in sys.argv[1:]) and not any(
        arg.startswith(("build", "bdist", "install", "develop", "editable")) for arg in sys.argv[1:]
    ):
        return [], {}
    build, reason = _want_extension()
    if not build:
        _log(f"building without the CUDA extension ncclep._C: {reason}")
        return [], {}

    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cuda_home = _find_cuda_home()
    cpu_torch = not torch.version.cuda
    if cpp_extension.CUDA_HOME != cuda_home:
        # Ours also skips nvcc wrapper scripts on PATH; a CPU-only torch has none (forced build).
        _log(f"using the CUDA toolkit at {cuda_home} (torch found {cpp_extension.CUDA_HOME})")
        cpp_extension.CUDA_HOME = cuda_home

    nccl_include, nccl_lib, where = _find_nccl()
    version = _nccl_header_version(nccl_include)
    if (
        version is None
        or version < MIN_NCCL
        or not os.path.exists(os.path.join(nccl_include, "nccl_device.h"))
    ):
        _fail(
            f"NCCL at {os.path.dirname(nccl_include)} ({where}) is version {version}; ncclep needs "
            f">= {'.'.join(map(str, MIN_NCCL))} with the Device API (nccl_device.h)"
        )
    if os.path.exists(os.path.join(nccl_lib, "libnccl.so.2")):
        nccl_link = ["-l:libnccl.so.2"]  # the wheel ships no unversioned libnccl.so
    else:
        nccl_link = ["-lnccl"]
    _log(f"building ncclep._C ({reason}); NCCL {'.'.join(map(str, version))} from {where}: {nccl_lib}")

    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc"), nccl_include]
    cccl = os.path.join(cuda_home, "include", "cccl")
    if os.path.isdir(cccl):
        include_dirs.append(cccl)  # CUDA 13 keeps cuda/std here; host files need it too

    ext = CUDAExtension(
        name="ncclep._C",
        sources=_sources(),
        include_dirs=include_dirs,
        library_dirs=[nccl_lib],
        extra_compile_args={
            "cxx": ["-O3"],
            # No fast-math: kernels must be bit-exact with the CPU reference.
            # The NCCL Device API is header-only inline: no relocatable device code.
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *_arch_flags()],
        },
        extra_link_args=[*nccl_link, f"-Wl,-rpath,{nccl_lib}"],
    )
    if cpu_torch:
        # Forced build against a CPU-only torch (compile checks): it has no CUDA libraries,
        # and the extension does not need them.
        ext.libraries = [lib for lib in ext.libraries if lib not in ("c10_cuda", "torch_cuda")]
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_config()
PLOT = ["matplotlib"]

setup(
    name="ncclep",
    version=VERSION,
    description="Expert-parallel MoE dispatch/combine on NCCL's Device API",
    packages=find_packages(include=["ncclep", "ncclep.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={
        "mpi": ["mpi4py"],  # launching under mpirun (ncclep.bootstrap); the C examples need only MPI
        "plot": PLOT,  # ncclep-bench --plot
        "test": ["pytest", "ruff", *PLOT],  # scripts/test.sh: pytest, the linter, the bench's --plot test
        "docs": ["sphinx>=7", "myst-parser>=2"],  # scripts/docs.sh: docs/ (Markdown pages, autodoc)
        "vllm": ["vllm>=0.32"],
    },
    entry_points={
        "console_scripts": ["ncclep-bench = ncclep.bench.cli:main"],
        "vllm.general_plugins": ["ncclep = ncclep.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
