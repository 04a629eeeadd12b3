"""TensorBoard: event files in `<run dir>/tensorboard/` — per epoch (TensorBoard's step = the epoch) the
metrics `tracked_metrics` allows, the hyperparameters through the HParams plugin (one entry per run, so
`tensorboard --logdir results/<sweep>` compares a sweep's points), and the privacy statement as text at
the end. Needs the `tensorboard` package (its summary ops and the HParams plugin)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpsgd_cli.errors import OutputError

FOLDER = "tensorboard"
STATEMENT_TAG = "privacy_statement"


class TensorBoardTracker:
    def __init__(self, run_dir: Path, name: str):
        self.logdir = Path(run_dir) / FOLDER
        self.name = name
        self.writer = None
        self.last_epoch = 0

    def start(self, params: Mapping[str, Any], logged: Sequence[Mapping[str, Any]]) -> None:
        """Open the writer; a new run writes its hyperparameters; a resumed run adds the epochs its event
        files lack (those finished between the last event and the interruption)."""
        import tensorflow as tf

        present = logged_epochs(self.logdir)
        self.writer = tf.summary.create_file_writer(str(self.logdir))
        if not present:
            from tensorboard.plugins.hparams import api as hp

            with self.writer.as_default():
                hp.hparams(dict(params), trial_id=self.name)
        for values in logged:
            if values["epoch"] not in present:
                self.log_epoch(values)
        self.writer.flush()

    def log_epoch(self, values: Mapping[str, Any]) -> None:
        import tensorflow as tf

        try:
            with self.writer.as_default():
                for key, value in values.items():
                    if key != "epoch":
                        tf.summary.scalar(key, value, step=int(values["epoch"]))
            self.writer.flush()
        except Exception as exc:  # I/O errors surface from TensorFlow in several types
            raise OutputError(f"{self.logdir}: cannot write TensorBoard events ({exc.__class__.__name__})") \
                from None
        self.last_epoch = int(values["epoch"])

    def finish(self, statement: str, run_dir: Path) -> None:
        import tensorflow as tf

        with self.writer.as_default():
            tf.summary.text(STATEMENT_TAG, statement, step=self.last_epoch)
        self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _events(logdir: Path):
    """The events of every event file under `logdir`, in file order (records read with tf.data)."""
    import tensorflow as tf

    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            yield tf.compat.v1.Event.FromString(raw.numpy())


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files under `logdir` (the last value of a step
    wins)."""
    from tensorboard.util import tensor_util

    out: dict[str, dict[int, float]] = {}
    for event in _events(logdir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                out.setdefault(value.tag, {})[int(event.step)] = float(tensor_util.make_ndarray(value.tensor))
    return out


def logged_epochs(logdir: Path) -> set[int]:
    """The epochs whose test accuracy the event files under `logdir` already hold."""
    if not Path(logdir).is_dir():
        return set()
    return set(read_scalars(logdir).get("test_accuracy", {}))
