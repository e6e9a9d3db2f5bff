"""The command line: library errors and log lines in flag names, defaults equal to the library's, a light parser."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import subprocess
import sys

from python_task import cli
from python_task.errors import ConfigError, SlideError, TaskError
from python_task.shards.params import ExtractParams


def flags() -> dict[str, str]:
    return cli.option_flags(cli.build_parser())


def test_errors_name_files_or_flags():
    f = flags()
    assert cli.error_line(ConfigError("batch_size", "must be at least 1, got 0"), f) == \
        "error: --batch-size: must be at least 1, got 0"
    assert cli.error_line(SlideError("a.svs", "no µm/px; give it with `slide_mpp`"), f) == \
        "error: a.svs: no µm/px; give it with --slide-mpp"
    assert cli.error_line(ConfigError("depth", "unet_encoder depth must be 1-8"), f) == \
        "error: depth: unet_encoder depth must be 1-8"  # a setting the command line does not offer keeps its name
    assert cli.error_line(TaskError(None, "make it with `python -m python_task split` or `nothing`"), f) == \
        "error: make it with `python -m python_task split` or `nothing`"


def test_log_lines_speak_flags():
    formatter = cli._LogFormatter(flags())  # noqa: SLF001
    info = logging.LogRecord("python_task.shards.extract", logging.INFO, __file__, 1, "S1: lower `min_tissue`",
                             None, None)
    warning = logging.LogRecord("python_task.wsi.slides", logging.WARNING, __file__, 1, "upsampled %dx", (2,), None)
    assert formatter.format(info) == "S1: lower --min-tissue"
    assert formatter.format(warning) == "WARNING python_task.wsi.slides: upsampled 2x"


def test_defaults_are_the_library_defaults():
    from python_task.experiments.demo import DemoConfig
    from python_task.inference.predict import predict_slide

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))  # noqa: SLF001
    predict = {a.dest: a.default for a in sub.choices["predict"]._actions}  # noqa: SLF001
    signature = inspect.signature(predict_slide).parameters
    for name in ("batch_size", "min_tissue", "min_coverage", "stride", "slide_mpp"):
        assert predict[name] == signature[name].default, name
    from python_task.data.splits import make_splits

    split = {a.dest: a.default for a in sub.choices["split"]._actions}  # noqa: SLF001
    for name in ("tune_fraction", "test_fraction"):
        assert split[name] == inspect.signature(make_splits).parameters[name].default, name
    assert tuple(predict["offset"]) == signature["offset"].default and predict["reader"] == signature["reader_name"].default
    demo = DemoConfig()
    assert cli.DEMO_DEFAULTS == {k: getattr(demo, k) for k in cli.DEMO_DEFAULTS}
    extract = {a.dest: a.default for a in sub.choices["extract"]._actions}  # noqa: SLF001
    for field in dataclasses.fields(ExtractParams):
        if field.name in extract and field.name not in ("labels", "ignore_unknown"):
            assert extract[field.name] == field.default, field.name


def test_help_does_not_load_keras_or_the_slide_readers():
    code = ("import sys; import python_task.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('keras', 'tensorflow', 'openslide', 'h5py', 'scipy.ndimage', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_an_unexpected_os_error_names_its_file(monkeypatch, capsys):
    import errno

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/.S1.h5.x1y2.tmp")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: cli.argparse.Namespace(
        handler=full_disk, verbose=False, debug=False, command="extract"))
    assert cli.main([]) == 1
    assert capsys.readouterr().err.strip() == "error: /data/out/.S1.h5.x1y2.tmp: No space left on device"


def test_running_out_of_memory_is_its_own_exit_status(monkeypatch, capsys):
    """A point bounded by `ulimit -d` that allocates past it: one line and exit status 3, which the OpenMOLE plans
    and the sweep record as out of memory, apart from an unexpected failure (2)."""
    from python_task.errors import EXIT_OUT_OF_MEMORY

    class ResourceExhaustedError(Exception):  # TensorFlow's, by name: the CLI does not import TensorFlow
        pass

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for error, name in [(MemoryError(), "MemoryError"), (ResourceExhaustedError("OOM when allocating tensor"),
                                                         "ResourceExhaustedError"),
                        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), "RuntimeError")]:
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(parser, "parse_args", lambda argv, fail=fail: cli.argparse.Namespace(
            handler=fail, verbose=False, debug=False, command="train"))
        assert cli.main([]) == EXIT_OUT_OF_MEMORY == 3
        assert capsys.readouterr().err.strip() == f"error: train: out of memory: {name}"
    monkeypatch.setattr(parser, "parse_args", lambda argv: cli.argparse.Namespace(
        handler=lambda args: 1 / 0, verbose=False, debug=False, command="train"))
    assert cli.main([]) == 2, "any other failure keeps its status"


def test_other_libraries_log_lines_stay_off_stderr(capsys):
    cli.configure_logging(False, flags())
    logging.getLogger("tifffile").error("<tifffile.TiffPages @8> invalid page offset 1059178")
    logging.getLogger("python_task.shards.extract").warning("kept")
    err = capsys.readouterr().err
    assert "tifffile" not in err and "WARNING python_task.shards.extract: kept" in err
    cli.configure_logging(True, flags())
    logging.getLogger("tifffile").error("shown with -v")
    assert "ERROR tifffile: shown with -v" in capsys.readouterr().err
    cli.configure_logging(False, flags())


def test_tensorflows_native_notices_stay_off_stderr_and_the_rest_gets_out_even_after_a_crash():
    """Native code writes absl's and oneDNN's notices straight to descriptor 2 (on AVX-512 CPUs despite
    TF_CPP_MIN_LOG_LEVEL): the command line's filter drops those, keeps error lines, and loses nothing when the
    process then dies."""
    code = "\n".join([
        "import os, sys",
        "from python_task.runtime import filter_native_notices",
        "filter_native_notices()",
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')",
        "os.write(2, b'I0000 00:00:1796677289.606413   30662 port.cc:153] oneDNN custom operations are on.\\n')",
        "os.write(2, b'W0000 00:00:1796677289.606413   30662 cpu_feature_guard.cc:210] This TensorFlow binary\\n')",
        "os.write(2, b'To enable the following instructions: AVX512F, in other operations, rebuild TensorFlow with "
        "the appropriate compiler flags.\\n')",
        "os.write(2, b'E0000 00:00:1796677289.606413   30662 cuda.cc:1] a native error\\n')",
        "print('error: x.h5: a line of ours', file=sys.stderr)",
        "os.abort()",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode < 0, "aborted"
    assert proc.stderr.splitlines() == ["E0000 00:00:1796677289.606413   30662 cuda.cc:1] a native error",
                                        "error: x.h5: a line of ours"]
