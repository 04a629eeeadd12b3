"""Bad input, tried systematically (hypothesis): random and malformed YAML, wrong types, out-of-range values,
garbage --set items, missing files, corrupt dataset files and damaged checkpoints. Each must end with one
line `error: …` and exit code 2 (1 for I/O), never a traceback, and must leave the results directory (which
holds a finished and an unfinished run) exactly as it was.

`dpsgd epsilon` and `dpsgd noise` get random numbers too, extremes included (0, negative, 1e-300, 1e300,
±inf, nan, 10^400 steps …): each call either answers (exit 0) or fails in one line that names the option or
config key, and the libraries underneath log no warnings.

The CLI runs in-process (typer's CliRunner). Nearly every input fails before TensorFlow is imported: config
errors at validation, data errors while reading the IDX files, checkpoint damage at load. At the end the
module prints how many inputs were tried, which error classes they hit, and the slowest epsilon/noise call.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_train import MISSING_DATA, make_run_dir
from typer.testing import CliRunner

from dpsgd_cli.cli import app, run
from dpsgd_cli.config import _SECTIONS, ExperimentConfig
from dpsgd_cli.runs import checkpoint
from dpsgd_cli.training.data import FILES, write_idx

app_module = importlib.import_module("dpsgd_cli.cli.app")  # the module (`dpsgd_cli.cli.app` is the Typer app)
# (input category, error class) → count, over the whole module
TRIED: Counter[tuple[str, str]] = Counter()
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """A results directory with a finished and an unfinished run, a small valid data directory, a scratch
    directory for inputs; the CLI runs with the working directory set to an empty folder."""
    root = tmp_path_factory.mktemp("bad-input")
    results, scratch, cwd = root / "results", root / "scratch", root / "cwd"
    for folder in (results, scratch, cwd):
        folder.mkdir()
    make_run_dir(results / "done", "finished", epochs=2, epochs_done=2)
    make_run_dir(results / "half", "interrupted", epochs=3, epochs_done=1)
    data = root / "data" / "fashion_mnist"
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("test", 40)):
        write_idx(data, rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n), split)
    real_fail = app_module.fail
    seen: list[str] = []

    def spying_fail(message: str, code: int = 2) -> None:
        seen.append(type(sys.exc_info()[1]).__name__)
        real_fail(message, code)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_module, "fail", spying_fail)
        patch.chdir(cwd)
        patch.setenv("DPSGD_DATA_DIR", MISSING_DATA)
        yield {"root": root, "results": results, "scratch": scratch, "cwd": cwd, "data": data.parent,
               "seen": seen}
    _report(request)


def _report(request) -> None:
    total = sum(TRIED.values())
    lines = [f"bad-input property test: {total} inputs tried"]
    for category in sorted({c for c, _ in TRIED}):
        hits = {k: n for (c, k), n in TRIED.items() if c == category}
        lines.append(f"  {category:<18} {sum(hits.values()):>4}: "
                     + ", ".join(f"{k} {n}" for k, n in sorted(hits.items(), key=lambda kv: -kv[1])))
    classes = Counter()
    for (_, kind), n in TRIED.items():
        classes[kind] += n
    lines.append("  by error class: " + ", ".join(f"{k} {n}" for k, n in classes.most_common()))
    if SLOWEST[0][1]:
        lines.append(f"  slowest epsilon/noise call: {SLOWEST[0][0]:.1f} s: dpsgd {' '.join(SLOWEST[0][1])}")
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every file and directory under `folders`, with a digest of each file's bytes."""
    snap = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            snap[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snap


def check_rejected(world, category: str, args: list[str], *, watch: tuple[Path, ...] = ()) -> str:
    """Invoke `dpsgd <args>`; assert a one-line error, exit 2 (or 1), no traceback, nothing changed."""
    folders = (world["results"], world["cwd"], *watch)
    before = _snapshot(*folders)
    world["seen"].clear()
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{category}: {args!r} raised {result.exception!r}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (category, args, result.output)
    assert "Traceback" not in result.output
    assert result.exit_code == 2 or (result.exit_code == 1 and world["seen"] == ["OutputError"]), (
        category, args, result.exit_code, result.output)
    assert _snapshot(*folders) == before, f"{category}: {args!r} changed the results directory"
    TRIED[(category, world["seen"][0] if world["seen"] else "?")] += 1
    return lines[0]


def _pinned(world, *, name: str | None = None) -> list[str]:
    """--set items appended last: results go to the watched directory, data come from nowhere."""
    items = [f"output_dir={world['results']}", f"data.data_dir={MISSING_DATA}"]
    items += [f"name={name}"] if name else []
    return [a for item in items for a in ("--set", item)]


def _scratch_file(world, content: str | bytes, suffix: str = ".yaml") -> Path:
    fd, name = tempfile.mkstemp(dir=world["scratch"], suffix=suffix)
    with open(fd, "wb") as handle:
        handle.write(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return Path(name)


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------
# '[' and ']' are left out of free text: rich would read them as markup in the error line (see
# test_error_text_with_square_brackets_is_printed_verbatim); everything else is fair game.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
YAML_TOKENS = st.sampled_from([
    "{", "}", ":", ": ", "- ", ",", "&a ", "*a", "*b", "!!binary ", "!!python/object:os.system ", "!!set ",
    "!!float ", "!!int ", "'", '"', "\t", "\n", "\n  ", "  ", "---\n", "...\n", "%YAML 1.1\n", "? ", "| ",
    "> ", "# c", "@", "`", "\x00", "\ufeff", "é", "seed", "data", "batch_size", "privacy", "epochs", "name",
    "1e400", "-.inf", ".nan", "0x1F", "0o17", "1_000", "~", "null", "yes", "no", "2001-12-14", "=",
    "noise_multiplier", "training", "learning_rate", "model", "0", "-1", "1.5", "\\u0000", "\r\n",
])
YAML_TEXT = st.one_of(TEXT, st.lists(YAML_TOKENS, max_size=25).map("".join))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT,
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 10**30, 1e308, -0.0, 0.5, 1.0, 1.5, "1e-5", "nan", "inf",
                     "-inf", "0x10", "1_000", "", " ", "auto", "relu", "adam", "poisson", "shuffle", "mnist",
                     "fashion_mnist", "done", "half", "../x", "a/b", ".hidden", "x" * 300]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=2))
FIELDS = {"": [f for f in ExperimentConfig.__dataclass_fields__ if f not in _SECTIONS],
          **{s: list(cls.__dataclass_fields__) for s, cls in _SECTIONS.items()}}
DOTTED = [f"{s}.{f}" if s else f for s, fs in FIELDS.items() for f in fs]


@st.composite
def configs(draw) -> dict:
    """A config mapping: mostly real keys with hostile values, sometimes an unknown key or a bad section."""
    raw: dict = {}
    for key in draw(st.lists(st.sampled_from(DOTTED), min_size=1, max_size=6, unique=True)):
        section, _, field = key.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        if isinstance(target, dict):
            target[field] = draw(VALUES)
    extra = draw(st.sampled_from([None, None, None, "unknown_key", "section_scalar", "privacy_typo"]))
    if extra == "unknown_key":
        raw[draw(TEXT.filter(bool))] = draw(SCALARS)
    elif extra == "section_scalar":
        raw[draw(st.sampled_from(list(_SECTIONS)))] = draw(SCALARS)
    elif extra == "privacy_typo":
        raw.setdefault("privacy", {})["sigma"] = 1.1
    return raw


# ------------------------------------------------------------------------------------------------
# The properties
# ------------------------------------------------------------------------------------------------
@settings(max_examples=120, **SETTINGS)
@given(text=YAML_TEXT)
def test_random_yaml_documents(world, text):
    path = _scratch_file(world, text)
    check_rejected(world, "yaml text", ["train", "--config", path, *_pinned(world)])


@settings(max_examples=150, **SETTINGS)
@given(raw=configs(), via_set=st.booleans(), flags=st.sampled_from([[], ["--overwrite"], ["--quiet"]]),
       name=st.sampled_from([None, None, "done", "half", "fresh"]))
def test_wrong_types_and_out_of_range_values(world, raw, via_set, flags, name):
    """The same hostile mapping as a YAML file or as --set items; sometimes aimed at an existing run, with
    --overwrite (which must not delete it when the new run cannot start)."""
    if via_set:
        def items(tree, prefix=""):
            for key, value in tree.items():
                if isinstance(value, dict) and key in _SECTIONS and not prefix:
                    yield from items(value, f"{key}.")
                else:
                    yield f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
        args = [a for item in items(raw) for a in ("--set", item)]
    else:
        args = ["--config", _scratch_file(world, yaml.safe_dump(raw, allow_unicode=True))]
    check_rejected(world, "wrong values", ["train", *args, *flags, *_pinned(world, name=name)])


@settings(max_examples=60, **SETTINGS)
@given(items=st.lists(st.one_of(TEXT, st.builds("{}={}".format, st.sampled_from(DOTTED + ["x.y", "data.x.y",
                                                                                          "", ".", "seed."]),
                                                 TEXT)), min_size=1, max_size=4))
def test_garbage_set_items(world, items):
    args = [a for item in items for a in ("--set", item)]
    check_rejected(world, "--set items", ["train", *args, *_pinned(world)])


@settings(max_examples=40, **SETTINGS)
@given(damage=st.sampled_from(["truncate_gz", "random_bytes", "empty", "bad_magic", "bad_count",
                               "truncate_body", "bad_dims", "label_too_big", "missing_file", "fewer_labels",
                               "bad_trailer"]),
       which=st.sampled_from(list(FILES)), cut=st.floats(0, 0.999), value=st.integers(0, 2**32 - 1),
       junk=st.binary(max_size=64))
def test_corrupt_dataset_files(world, damage, which, cut, value, junk):
    """A valid small dataset with one file damaged so that it can no longer be read as what it claims."""
    data = Path(tempfile.mkdtemp(dir=world["scratch"]))
    shutil.copytree(world["data"], data, dirs_exist_ok=True)
    path = data / "fashion_mnist" / FILES[which]
    blob = path.read_bytes()
    raw = gzip.decompress(blob)
    images = which.endswith("images")
    header = 16 if images else 8
    if damage == "truncate_gz":
        new = blob[:int(cut * len(blob))]
    elif damage == "random_bytes":
        new = b"\x1f\x8b" + junk if value % 2 else junk
    elif damage == "empty":
        new = b""
    elif damage == "bad_trailer":  # the CRC-32 / length trailer of the gzip stream
        i = len(blob) - 1 - value % 8
        new = blob[:i] + bytes([blob[i] ^ (1 + value % 255)]) + blob[i + 1:]
    elif damage == "missing_file":
        path.unlink()
        new = None
    else:
        body = bytearray(raw)
        if damage == "bad_magic":
            magic = value if value not in (0x801, 0x803) else 0x802
            body[0:4] = magic.to_bytes(4, "big")
        elif damage == "bad_count":
            count = int.from_bytes(body[4:8], "big")
            body[4:8] = (value if value != count else count + 1).to_bytes(4, "big")
        elif damage == "truncate_body":
            body = body[:header + int(cut * (len(body) - header))]
        elif damage == "bad_dims" and images:
            body[8:12] = (value if value != 28 else 27).to_bytes(4, "big")
        elif damage == "label_too_big" and not images:
            body[header + value % (len(body) - header)] = 10 + value % 246
        else:  # bad_dims on labels / label_too_big on images / fewer_labels: one example fewer
            count = int.from_bytes(body[4:8], "big") - 1
            body[4:8] = count.to_bytes(4, "big")
            body = body[:len(body) - (784 if images else 1)]
        new = gzip.compress(bytes(body))
    if new is not None:
        path.write_bytes(new)
    line = check_rejected(world, "corrupt data", [
        "train", "--sigma", "1", "--set", "data.batch_size=8", "--set", f"output_dir={world['results']}",
        "--set", f"data.data_dir={data}", "--name", "fresh"])
    assert str(path.parent) in line or "split" in line


@settings(max_examples=60, **SETTINGS)
@given(damage=st.sampled_from(["truncate", "flip", "append", "replace", "empty", "run_yaml"]),
       at=st.floats(0, 0.999), bit=st.integers(0, 7), junk=st.binary(min_size=1, max_size=200))
def test_damaged_checkpoints_and_run_yaml(world, damage, at, bit, junk):
    """An unfinished run whose checkpoint (or run.yaml) is damaged: --resume refuses, touching nothing."""
    run_dir = Path(tempfile.mkdtemp(dir=world["scratch"])) / "half"
    shutil.copytree(world["results"] / "half", run_dir)
    target = checkpoint.path_in(run_dir) if damage != "run_yaml" else run_dir / "run.yaml"
    blob = target.read_bytes()
    i = int(at * len(blob))
    new = {"truncate": blob[:i], "flip": blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1:],
           "append": blob + junk, "replace": junk, "empty": b"",
           "run_yaml": b"\xff" + junk if bit % 2 else b"{" + junk}[damage]
    target.write_bytes(new)
    line = check_rejected(world, "damaged checkpoint", ["train", "--resume", run_dir], watch=(run_dir,))
    assert "checkpoint is corrupt" in line or "run.yaml" in line or "unreadable" in line, line


# ------------------------------------------------------------------------------------------------
# `dpsgd epsilon` and `dpsgd noise`: random numbers, extremes included. These may also succeed, so each
# call must either answer (exit 0, nothing on stderr) or refuse in one line that names an option or key.
# ------------------------------------------------------------------------------------------------
ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# (seconds, args) of the slowest call, reported at the end
SLOWEST: list[tuple[float, list[str]]] = [(0.0, [])]
EXTREME_FLOATS = [0.0, -0.0, -1.0, 5e-324, 1e-300, 1e-160, 1e-30, 1e-16, 1e-5, 1e-4, 9.99e-5, 0.01, 0.3, 0.5,
                  1 - 1e-16, 1.0, 1.1, 2.0, 1e3, 1e6, 1.000001e6, 1e9, 1e12, 1e300, 1.7976931348623157e308,
                  math.inf, -math.inf, math.nan]
NUMBERS = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(), st.floats(1e-3, 1e3))
UNREACHABLE_TARGETS = [v for v in EXTREME_FLOATS if not 1e-3 < v < 1e3]  # (and nan) no σ the accountants take
COUNTS = st.one_of(st.sampled_from([-1, 0, 1, 2, 10**9, 10**9 + 1, 2**63 - 1, 2**63, 10**30, 10**400]),
                   st.integers(-3, 1000), st.integers(1, 10**12))
FLOAT_OPTIONS = ["--sigma", "--target-epsilon", "--epochs", "--sampling-rate", "--delta"]  # (only one of the
# first two is an option of each command)
INT_OPTIONS = ["--steps", "--batch-size", "--dataset-size", "--num-microbatches"]
OPTION_OR_KEY = re.compile(r"--[a-z]|\b(privacy|data|training)\.[a-z_]+")


@st.composite
def privacy_questions(draw, command: str, accountants: list[str], main_values) -> list[str]:
    """A `dpsgd epsilon` or `dpsgd noise` command line: a well-formed question with plausible numbers, then
    up to three options set to extremes (0, negative, 1e-300, 1e300, ±inf, nan, 2^63, 10^400, any float),
    dropped, or added where they conflict. `main_values`: for σ or the target ε."""
    main = "--sigma" if command == "epsilon" else "--target-epsilon"
    options: dict[str, str | None] = {main: repr(float(draw(main_values)))}
    if draw(st.booleans()):
        options["--steps"] = str(draw(st.integers(1, 20_000)))
    else:
        options["--epochs"] = repr(draw(st.floats(0.1, 100)))
    if draw(st.booleans()):
        options["--sampling-rate"] = repr(draw(st.floats(1e-4, 1)))
    else:
        batch = draw(st.sampled_from([1, 64, 256, 1000]))
        options["--batch-size"] = str(batch)
        options["--dataset-size"] = str(draw(st.integers(batch, 100_000)))
    if draw(st.booleans()):
        options["--delta"] = repr(draw(st.floats(1e-12, 1e-2)))
    options["--accountant"] = draw(st.sampled_from(accountants))
    if command == "epsilon" and "--epochs" in options and not draw(st.integers(0, 4)):
        options["--per-epoch"] = None
    own = [main, *FLOAT_OPTIONS[2:], *INT_OPTIONS, "--sampling"]
    own += ["--per-epoch"] if command == "epsilon" else []
    for _ in range(draw(st.integers(0, 3))):
        option = draw(st.sampled_from(own))
        action = draw(st.sampled_from(["extreme", "extreme", "extreme", "drop"]))
        if action == "drop":
            options.pop(option, None)
        elif option in FLOAT_OPTIONS:
            options[option] = repr(float(draw(NUMBERS)))
        elif option in INT_OPTIONS:
            options[option] = str(draw(COUNTS))
        elif option == "--sampling":
            options[option] = draw(st.sampled_from(["shuffle", "poisson"]))
        else:
            options[option] = None
    args = [command]
    for option, value in options.items():
        args += [option] if value is None else [option, value]
    return args + (["--json"] if draw(st.booleans()) else [])


def check_answered_or_rejected(world, category: str, args: list[str]) -> str | None:
    """Invoke `dpsgd <args>`: exit 0 with an answer and a silent stderr, or one line `error: …` naming an
    option or config key with exit 2. Never a traceback, nor warnings from the libraries underneath."""
    world["seen"].clear()
    noise: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: noise.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    started = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(app, args)
    finally:
        logging.getLogger().removeHandler(handler)
    SLOWEST[:] = [max(SLOWEST[0], (time.monotonic() - started, args))]
    noise += [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category,
                                                                                       DeprecationWarning)]
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{category}: {args!r} raised {result.exception!r}")
    assert "Traceback" not in result.output, (args, result.output)
    assert not noise, (args, noise)
    if result.exit_code == 0:
        assert result.stdout.strip() and not result.stderr.strip(), (args, result.output)
        TRIED[(category, "answered")] += 1
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        args, result.exit_code, result.output)
    assert OPTION_OR_KEY.search(lines[0]), f"{args!r}: the error names no option or key: {lines[0]}"
    TRIED[(category, world["seen"][0] if world["seen"] else "?")] += 1
    return lines[0]


# A plausible σ is one whose PLD is quick to build (σ ≥ 0.5: under 1.5 s); extremes reach the slow corners.
@settings(max_examples=60, **SETTINGS)
@given(args=privacy_questions("epsilon", ["rdp", "rdp", "rdp", "pld", "all"], st.floats(0.5, 20)))
def test_epsilon_with_random_and_extreme_numbers(world, args):
    check_answered_or_rejected(world, "epsilon options", args)


@settings(max_examples=40, **SETTINGS)
@given(args=privacy_questions("noise", ["rdp"], st.one_of(NUMBERS, st.floats(0.2, 4))))
def test_noise_with_random_and_extreme_numbers(world, args):
    check_answered_or_rejected(world, "noise options", args)


# Calibrating σ with the PLD accountant for a plausible target takes 5–60 s (a new PLD for every σ tried,
# tested in test_calibration): here only targets too small or too large for any σ, or not numbers at all.
@pytest.mark.slow  # a PLD per σ tried
@settings(max_examples=15, **SETTINGS)
@given(args=privacy_questions("noise", ["pld"], st.sampled_from(UNREACHABLE_TARGETS)))
def test_noise_with_the_pld_accountant_and_extreme_targets(world, args):
    check_answered_or_rejected(world, "noise options", args)


CONFIG_NUMBERS = {"privacy.noise_multiplier": st.floats(0.5, 20), "privacy.delta": st.floats(1e-12, 1e-2),
                  "training.epochs": st.integers(1, 200), "data.batch_size": st.integers(1, 60_000),
                  "privacy.target_epsilon": st.none()}
# A plausible target ε has σ calibrated with the PLD accountant (10–30 s, tested elsewhere): extremes only.
UNREACHABLE = st.sampled_from(UNREACHABLE_TARGETS)


@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), accountant=st.sampled_from(["rdp", "rdp", "pld", "all"]))
def test_epsilon_of_a_config_with_random_and_extreme_numbers(world, data, accountant):
    """`dpsgd epsilon --config` with one or two numbers set to anything: σ as given or calibrated from
    privacy.target_epsilon (with the PLD accountant, as `dpsgd train` does)."""
    keys = data.draw(st.lists(st.sampled_from(list(CONFIG_NUMBERS)), min_size=1, max_size=2, unique=True))
    items = [f"{key}={data.draw(UNREACHABLE if key == 'privacy.target_epsilon' else numbers)!r}"
             for key in keys for numbers in [st.one_of(NUMBERS, COUNTS, CONFIG_NUMBERS[key])]]
    if "privacy.target_epsilon" in keys:
        items.append("privacy.noise_multiplier=null")
    args = ["epsilon", "--config", str(QUICKSTART), *(a for item in items for a in ("--set", item)),
            "--accountant", accountant]
    check_answered_or_rejected(world, "epsilon --config", args)


@pytest.mark.parametrize("args, expected", [
    (["epsilon", "--steps", "2", "--sigma", "1e-300", "--batch-size", "256", "--dataset-size", "512"],
     "--sigma: σ = 1e-300 is below 0.0001"),
    (["epsilon", "--steps", "2", "--sigma", "1e300", "--sampling-rate", "0.5"],
     "--sigma: σ = 1e+300 is above"),
    (["noise", "--target-epsilon", "1e9", "--steps", "1", "--batch-size", "256", "--dataset-size", "60000"],
     "--target-epsilon: ε = 1e+09 is so large that even σ = 0.0001"),
    (["noise", "--target-epsilon", "1e-3", "--steps", "1000000000", "--sampling-rate", "1"],
     "--target-epsilon: ε = 0.001 is out of reach"),
    (["noise", "--target-epsilon", "1e9", "--epochs", "1", "--batch-size", "256", "--dataset-size", "60000",
      "--accountant", "pld"], "--accountant: σ = "),
    (["epsilon", "--steps", "1000", "--sigma", "1", "--sampling-rate", "1", "--accountant", "pld"],
     "--accountant: 1,000 full-batch steps at σ = 1"),
    (["epsilon", "--epochs", "1e308", "--sigma", "1", "--batch-size", "256", "--dataset-size", "60000"],
     "--epochs 1e+308 means more steps than"),
    (["epsilon", "--steps", "1000000001", "--sigma", "1", "--sampling-rate", "0.01"],
     "--steps: 1,000,000,001 steps"),
    (["epsilon", "--steps", "100", "--sigma", "1", "--sampling-rate", "0.5", "--delta", "1e-20",
      "--accountant", "pld"], "--delta: δ = 1e-20 is not above 1e-15"),
    (["epsilon", "--sigma", "1", "--sampling-rate", "0.01", "--epochs", "1000", "--per-epoch", "--accountant",
      "pld"], "--per-epoch: a PLD curve of 1,000 points"),
    (["epsilon", "--config", str(QUICKSTART), "--set", "privacy.noise_multiplier=null", "--set",
      "privacy.target_epsilon=1e9"], "privacy.target_epsilon: ε = 1e+09 over 704 steps needs so little"),
    (["epsilon", "--config", str(QUICKSTART), "--set", "privacy.noise_multiplier=null", "--set",
      "privacy.target_epsilon=1e12"], "privacy.target_epsilon: ε = 1e+12 is so large"),
    (["epsilon", "--config", str(QUICKSTART), "--set", "training.epochs=10000000000"],
     "training.epochs: 10,000,000,000 epochs are more than"),
])
def test_accounting_extremes_name_the_option(world, args, expected):
    """Extremes that would crash the accountants (ZeroDivisionError, dp-accounting's
    NoBracketIntervalFoundError) and their siblings: each is one line that names the option or key and what
    it takes."""
    line = check_answered_or_rejected(world, "accounting extremes", args)
    assert line is not None and expected in line, line


@pytest.mark.parametrize("sets", [
    ["privacy.noise_multiplier=null", "privacy.target_epsilon=1e12"],
    ["privacy.noise_multiplier=null", "privacy.target_epsilon=1e9"],
    ["privacy.noise_multiplier=1e-300"],
    ["privacy.noise_multiplier=1e300"],
    ["privacy.noise_multiplier=1.1", "training.epochs=10000000000"],
])
def test_train_refuses_accounting_extremes_before_the_run_starts(world, sets):
    """The same values in `dpsgd train`: refused once the data is loaded, before the run directory exists."""
    args = ["train", "--set", f"data.data_dir={world['data']}", "--set", "data.batch_size=8", "--set",
            f"output_dir={world['results']}", "--name", "fresh", *(a for s in sets for a in ("--set", s))]
    line = check_rejected(world, "accounting extremes", args)
    assert sets[-1].split("=")[0] in line, line


@pytest.mark.parametrize("args", [
    ["train", "--config", "nonexistent.yaml"],
    ["train", "--config", "."],  # a directory
    ["train", "--resume", "nonexistent-run"],
    ["train", "--resume", "."],  # not a run directory
    ["train", "--sigma", "1", "--set", "data.data_dir=nonexistent-data"],
    ["train", "--sigma", "1", "--set", "data.data_dir=/dev/null"],  # a file, not a directory
])
def test_missing_files(world, args):
    check_rejected(world, "missing files", [*args, "--set", f"output_dir={world['results']}"]
                   if "--resume" not in args else args)


def test_binary_config_file(world):
    path = _scratch_file(world, b"\xff\xfe\x00garbage\x80")
    check_rejected(world, "missing files", ["train", "--config", path, *_pinned(world)])


def test_run_dir_that_is_a_file_or_unwritable(world, tmp_path):
    """Errors at run-directory creation are I/O (exit 1) or refusals (exit 2), never tracebacks."""
    (world["results"] / "plainfile").write_text("not a directory")
    sets = ["--sigma", "1", "--set", f"data.data_dir={world['data']}", "--set", "data.batch_size=8"]
    check_rejected(world, "missing files", ["train", *sets, "--set", f"output_dir={world['results']}",
                                            "--name", "plainfile"])
    check_rejected(world, "missing files", ["train", *sets, "--set",
                                            f"output_dir={world['results'] / 'plainfile'}", "--name", "x"])
    (world["results"] / "plainfile").unlink()


@pytest.mark.parametrize("text", [
    "seed: " + "[" * 1000,  # deeper than Python's recursion limit
    "seed:\n" + "".join(f" - &{c} [{', '.join(['*' + p] * 9 if p else ['1'] * 9)}]\n"
                        for p, c in zip(["", *"abcdefgh"], "abcdefghi")),  # 9**9 elements by aliases
])
def test_pathological_yaml(world, text):
    path = _scratch_file(world, text)
    check_rejected(world, "yaml text", ["train", "--config", path, *_pinned(world)])
    check_rejected(world, "--set items", ["train", "--set", text.replace("seed: ", "seed=", 1).split("\n")[0],
                                          *_pinned(world)])


def test_values_that_pass_validation_but_not_the_data(world):
    sets = ["--sigma", "1", "--set", f"data.data_dir={world['data']}",
            "--set", f"output_dir={world['results']}"]
    line = check_rejected(world, "wrong values", ["train", *sets, "--set", "data.batch_size=500"])
    assert "larger than the 120 training examples" in line


def test_error_text_with_square_brackets_is_printed_verbatim(world):
    line = check_rejected(world, "yaml text", ["train", "--set", "name=a[/x]b", *_pinned(world)])
    assert "a[/x]b" in line


@pytest.mark.parametrize("args, expected", [
    (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["train", "--sigma"], "Option '--sigma' requires an argument"),
    (["nonsense"], "No such command 'nonsense'"),
    (["epsilon", "--accountant"], "Option '--accountant' requires an argument"),
])
def test_malformed_command_lines_get_one_line_and_exit_2(capsys, args, expected):
    """What Typer/Click reject before a command runs gets the same one-line form as every other error."""
    code = run(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0] and "--help" in lines[0], lines[0]


def test_help_and_a_bare_dpsgd_still_show_the_help(capsys):
    assert run(["--help"]) == 0 and "Usage" in capsys.readouterr().out
    assert run([]) == 2  # Click's convention for "no command given"
    out, err = capsys.readouterr()
    assert "Usage" in out and err == ""


@pytest.mark.slow
def test_real_process_prints_one_line_and_no_tensorflow(world):
    """A handful of bad inputs through a real `python -m dpsgd_cli` process: exactly one stderr line (no
    TensorFlow start-up noise: they fail before it is imported) and the expected exit code."""
    bad_yaml = _scratch_file(world, "seed: [1, 2\n")
    damaged = Path(tempfile.mkdtemp(dir=world["scratch"])) / "half"
    shutil.copytree(world["results"] / "half", damaged)
    checkpoint.path_in(damaged).write_bytes(checkpoint.path_in(damaged).read_bytes()[:100])
    cases = [
        (["train", "--config", str(bad_yaml)], "not valid YAML"),
        (["train", "--set", "seed=-1"], "seed: must be in"),
        (["train", "--sigma", "1", "--set", f"data.data_dir={MISSING_DATA}"], "data directory not found"),
        (["train", "--resume", str(damaged)], "checkpoint is corrupt (truncated"),
        (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["train", "--sigma", "1", "--set", f"output_dir={world['results']}", "--name", "half"],
         "holds an unfinished run (epoch 1 of 3)"),
    ]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "dpsgd_cli", *args], capture_output=True, text=True,
                              cwd=world["cwd"], timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected in lines[0], lines[0]
        TRIED[("subprocess", "exit 2")] += 1

