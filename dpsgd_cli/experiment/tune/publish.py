"""Selection and publication: the trial with the best noisy score, once every trial is done, published
as a run folder whose every byte is a function of the search's settings and the winner alone (its config,
weights, test accuracy and noisy score) — never of K, of its index or of another trial."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpsgd_cli.atomic import atomic_write_text
from dpsgd_cli.config import replace
from dpsgd_cli.errors import OutputError, RunDirError
from dpsgd_cli.experiment.tune.plan import SearchPlan
from dpsgd_cli.experiment.tune.search import SELECTED_FILE, Search, Trial, _write_private
from dpsgd_cli.experiment.tune.trials import DIVERGED, SCORED, _read_score, trial_state
from dpsgd_cli.privacy import tuning
from dpsgd_cli.privacy.tune_statement import SearchFacts, search_statement
from dpsgd_cli.runs.run_dir import FINISHED, RUN_FILE, WEIGHTS_FILE, RunDir


@dataclass(frozen=True)
class Selection:
    """The published winner (None: no trial to publish — K = 0 or every trial diverged), the search's ε
    and the naive composition of the trials that ran (private: it reveals K)."""

    winner: Trial | None
    noisy_score: float | None
    epsilon: float
    naive_epsilon: float
    published: Path | None


def missing_trials(search: Search) -> list[Trial]:
    return [t for t in search.trials if trial_state(search, t) not in (SCORED, DIVERGED)]


def select_and_publish(search: Search) -> Selection:
    """Pick the trial with the best noisy score (ties: the earliest) and publish it, once every trial is
    done; a search already published is reported, not published again."""
    plan = search.plan
    missing = missing_trials(search)
    if missing:
        shown = ", ".join(str(t.index) for t in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise RunDirError(f"{plan.private_dir}: trials {shown} have not finished; run them "
                          "(dpsgd tune, or --index I for each) before selecting")
    scores = {t.index: _read_score(search, t) for t in search.trials}
    ran = [t for t in search.trials if "noisy_score" in scores[t.index]]
    naive = tuning.naive_epsilon([t.candidate.privacy for t in search.trials],
                                 plan.tune.score_noise_multiplier, plan.delta)
    if not ran:
        _write_private(plan.private_dir / SELECTED_FILE, {"winner": None, "trials": search.count,
                                                          "naive_epsilon": naive})
        return Selection(None, None, plan.epsilon, naive, None)
    winner = max(ran, key=lambda t: (scores[t.index]["noisy_score"], -t.index))
    noisy = float(scores[winner.index]["noisy_score"])
    selected = plan.private_dir / SELECTED_FILE
    if not (selected.is_file() and plan.publish_dir.is_dir()):
        publish(plan, winner, noisy)
        _write_private(selected, {"winner": winner.index, "noisy_score": noisy, "trials": search.count,
                                  "naive_epsilon": naive})
    return Selection(winner, noisy, plan.epsilon, naive, plan.publish_dir)


def publication(plan: SearchPlan, winner: Trial, noisy_score: float) -> dict[str, Any]:
    """The published run.yaml: a function of the search's settings and the winner's config, run and score
    only (never of its index, of K or of another trial)."""
    doc = RunDir(winner.run_dir).document()
    resolved = doc.get("resolved") or {}
    cfg = replace(winner.cfg, name=plan.name, output_dir=str(plan.output_dir))
    kept = ("noise_multiplier", "accounting_noise_multiplier", "sampling_rate", "microbatch_size",
            "total_steps", "dataset_size", "feature_norm")
    final = doc.get("final") or {}
    facts = SearchFacts(
        epsilon=plan.epsilon, delta=plan.delta, count=plan.count.describe(),
        space_size=plan.tune.space_size(), space_keys=tuple(a.key for a in plan.tune.space),
        candidates=len({c.privacy for c in plan.candidates}),
        noise_multiplier=winner.candidate.noise_multiplier, l2_norm_clip=cfg.privacy.l2_norm_clip,
        sampling_rate=winner.candidate.privacy.sampling_rate, steps=winner.candidate.privacy.steps,
        sampling=cfg.data.sampling, microbatch_size=winner.candidate.microbatch_size,
        releases=winner.candidate.privacy.releases, score_noise_multiplier=plan.tune.score_noise_multiplier,
        score_examples=plan.score_examples, holdout=bool(plan.tune.holdout),
        randomness="reproducible" if plan.base.privacy.reproducible else "secret")
    return {
        "status": FINISHED,
        "config": cfg.to_dict(),
        "randomness": ("reproducible: derived from seed and the search's name (privacy.reproducible: true)"
                       if plan.base.privacy.reproducible else
                       "secret: from the search's key, drawn from OS entropy and kept in its private folder"),
        "resolved": {k: resolved[k] for k in kept if k in resolved},
        "final": {"epoch": final.get("epoch"), "step": final.get("step"),
                  "test_accuracy": final.get("test_accuracy"), "epsilon_rdp": plan.epsilon},
        "search": {
            "epsilon": plan.epsilon, "delta": plan.delta, "accountant": "rdp",
            "distribution": plan.tune.distribution, "mean": plan.tune.mean, "shape": plan.tune.shape,
            "space": {a.key: a.to_dict() if a.is_range else f"{len(a.values)} listed values"
                      for a in plan.tune.space},
            "space_size": plan.tune.space_size(),
            "score": {"noisy_correct": noisy_score, "examples": plan.score_examples,
                      "noisy_accuracy": noisy_score / plan.score_examples,
                      "noise_multiplier": plan.tune.score_noise_multiplier,
                      "examples_from": "held-out end of the training split" if plan.tune.holdout
                      else "the training examples"},
        },
        "privacy_statement": search_statement(facts),
    }


def publish(plan: SearchPlan, winner: Trial, noisy_score: float) -> Path:
    """Write the publication folder (run.yaml and the winner's weights) in one rename."""
    dest = plan.publish_dir
    doc = publication(plan, winner, noisy_score)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RunDirError(f"{dest}: exists and is not empty; move it away to publish this search's winner")
    try:
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.publish."))
        os.chmod(staging, 0o755 & ~_umask())
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create ({exc.strerror or exc.__class__.__name__})") from None
    try:
        shutil.copyfile(winner.run_dir / WEIGHTS_FILE, staging / WEIGHTS_FILE)
        atomic_write_text(staging / RUN_FILE, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
