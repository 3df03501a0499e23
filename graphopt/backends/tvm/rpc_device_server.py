"""A TVM RPC server for a device: run this FILE with the device's Python (it imports only TVM, not graphopt).

    python rpc_device_server.py --host 0.0.0.0 --port 9090 [--tracker HOST:PORT --key arm]

It serves exactly what `python -m tvm.exec.rpc_server` serves (TVM's own listen loop, one forked process per
session), but starts the listener in this process instead of a TVM PopenWorker child, so the device imports
TVM once, not twice: under qemu-user that halves the start-up time. A runtime-only TVM (TVM_USE_RUNTIME_LIB=1,
as the qemu runtime of scripts/setup_cross.sh) does not load libtvm_runtime_extra, which holds the random fill
MetaSchedule's RPC runner calls; this script loads it. It prints one line
`graphopt-rpc-server listening on HOST:PORT` (flushed) once the socket is bound, then serves until killed. It
starts without ml_dtypes and PyTorch, which TVM imports when it can and a server never uses.
Where TVM's internals differ from 0.27's, it falls back to tvm.exec.rpc_server.
"""
import argparse
import sys

# Imported by tvm_ffi / TVM when present, never used by a server (nor by graphopt's tuning workers, which skip
# them too: tuning/workers.py): ml_dtypes (numpy's bfloat16/float8 types, for
# Python-side array conversions: 4.5 of the 8 s TVM's import takes under qemu) and PyTorch (DLPack conversions).
SKIPPED_IMPORTS = ("ml_dtypes", "torch")


def _skip_optional_imports() -> None:
    """Make `import ml_dtypes` / `import torch` fail (TVM and tvm_ffi go on without them)."""
    for name in SKIPPED_IMPORTS:
        sys.modules.setdefault(name, None)


def _load_runtime_extra() -> None:
    """Load libtvm_runtime_extra (random fill, etc.), which a runtime-only TVM does not load by itself:
    MetaSchedule's RPC runner fills its measurement inputs with tvm.contrib.random.random_fill_for_measure."""
    import tvm_ffi

    if tvm_ffi.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) is not None:
        return
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        load_lib_ctypes("tvm", "tvm_runtime_extra", "RTLD_GLOBAL", extra_lib_paths=tvm.libinfo.package_lib_paths())
    except (OSError, RuntimeError) as e:
        print(f"graphopt-rpc-server: no libtvm_runtime_extra ({e}); MetaSchedule measurements need it",
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int, default=0, help="end of the port search range (default port+50)")
    parser.add_argument("--tracker", default="", help="HOST:PORT of a TVM RPC tracker to register with")
    parser.add_argument("--key", default="", help="the device key to register under (needed with --tracker)")
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args(argv)
    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        tracker = (host, int(port))
        if not args.key:
            parser.error("--tracker needs --key")
    port_end = args.port_end or args.port + 50

    _load_runtime_extra()
    from tvm.rpc import server as rpc_server

    state_cls = getattr(rpc_server, "PopenRPCServerState", None)
    if state_cls is None:                                  # a TVM without the in-process state: stock server
        from tvm.exec import rpc_server as stock

        stock.main(argparse.Namespace(host=args.host, port=args.port, port_end=port_end,
                                            through_proxy=False, tracker=args.tracker or None, key=args.key,
                                            load_library=None, custom_addr=None, silent=args.silent, fork=True))
        return 0
    state = state_cls(args.host, args.port, port_end, False, tracker, args.key, None, None, args.silent)
    print(f"graphopt-rpc-server listening on {args.host}:{state.port}", flush=True)
    try:
        state.thread.join()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    _skip_optional_imports()
    sys.exit(main())
