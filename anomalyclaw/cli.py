"""The ``anomalyclaw`` command line: thin argument parsing over the library's functions.

Every subcommand that has a ``--json`` flag prints exactly one JSON object as the last line of
standard output, so scripts can read it with ``tail -n 1``. Errors print one line naming the
file, field or value. Exit statuses (the README's "Exit status" table says the same):

====  ===========================================================================================
0     done (a run where some items errored too: the reasons are printed)
1     a check did not pass: ``tools run`` where the tool does not apply or fails; ``eval --strict``
      when some rows were not read as written
2     a usage or input mistake: a flag out of range, a missing or invalid file, a split or domain
      that matches nothing, a resume whose settings differ
3     cannot go on: the endpoint does not answer or refuses the key or model, or an output file or
      folder cannot be written (read-only, a file in its place, disk full)
4     a run in which every item errored (the most common reasons are printed)
130   interrupted (Ctrl-C); 143: terminated (SIGTERM). A run writes its summary first; rerun
      with ``--resume``
====  ===========================================================================================
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # the command line imports the rest on use; for annotations only
    from anomalyclaw.eval.running.records import RecordsRead

from .errors import (EXIT_ALL_ERRORS, EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED,
                     EXIT_UNAVAILABLE, EXIT_USAGE, AnomalyClawError)

log = logging.getLogger("anomalyclaw")


class Terminated(BaseException):
    """SIGTERM outside a run's event loop (a run handles it itself and ends with its summary)."""


def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and checks the range, so that a bad value stops
    at parse time with the accepted range in the message."""
    noun = "a whole number" if kind is int else "a number"
    if low is not None and high is not None:
        accepted = f"{noun} {'>' if low_open else '>='} {low:g} and {'<' if high_open else '<='} {high:g}"
    elif low is not None:
        accepted = f"{noun} {'>' if low_open else '>='} {low:g}"
    else:
        accepted = noun

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
SEED = _number(int, 0)
FRACTION = _number(float, 0.0, 1.0)
EXPERT_WEIGHT = _number(float, 0.0)
SECONDS = _number(float, 0.0, low_open=True)
IMAGE_SIDE = _number(int, 64)


def _positive_list(text: str) -> list[int]:
    """``3,64`` -> [3, 64]: comma-separated whole numbers >= 1."""
    return [POSITIVE_INT(part.strip()) for part in text.split(",")]


def _thread_counts(text: str) -> list[int | None]:
    """``1,libs`` -> [1, None]: comma-separated thread counts >= 1, ``libs`` for the libraries'
    own defaults."""
    return [None if part.strip() == "libs" else POSITIVE_INT(part.strip()) for part in text.split(",")]


def _choices(allowed: Sequence[str]) -> Callable[[str], str]:
    """A comma-separated list of names from ``allowed``, kept as the string it was given."""
    def parse(text: str) -> str:
        bad = [name for name in text.split(",") if name not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}; got {bad[0]!r}")
        return text

    return parse


def _print_json(obj: dict) -> None:
    from anomalyclaw.eval.scoring.tables import rounded
    print(json.dumps(rounded(obj), sort_keys=False))


# ---------------------------------------------------------------------------------------- eval
def _read_for_eval(path: str, merge: bool, what: str = "") -> tuple[list, "RecordsRead"]:
    """Records under ``path`` for eval: says what was read, and every problem on stderr."""
    from anomalyclaw.eval.running.records import read_records

    read = read_records(path, merge=merge)
    files = read.files
    shown = ", ".join(f.name for f, _ in files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    print(f"read{what} {path}: {len(files)} file{'s' if len(files) != 1 else ''} ({shown}), {read.rows} rows")
    for line in read.messages():
        print(line, file=sys.stderr)
    return read.records, read


def _mcqa_report(records, args: argparse.Namespace) -> dict:
    """Print the multiple-choice tables of MCQ records (and their bootstrap); the --json part."""
    from anomalyclaw.eval.scoring.mcqa import bootstrap_mcqa, evaluate_mcqa, format_mcqa_table

    result = evaluate_mcqa(records)
    backends = sorted({r.backend for r in records if r.backend})
    print(format_mcqa_table(result, backends=backends))
    out = {k: result[k] for k in ("n", "accuracy", "per_type", "per_dataset", "unparsed")}
    out["stand_in"] = "offline" in backends
    if getattr(args, "bootstrap", 0) and result["n"]:
        b = bootstrap_mcqa(records, n_boot=args.bootstrap, seed=args.seed)
        print(f"refute - direct (MMAD average): {b.diff:+.2f}  {int(b.level * 100)}% CI [{b.ci_low:+.2f}, "
              f"{b.ci_high:+.2f}]  P(diff<=0)={b.p_le_zero:.3f}  ({b.n_questions} questions on {b.n_images} "
              f"images, resampled by image within dataset, {b.n_boot} resamples)")
        for t, d in b.per_type.items():
            print(f"  {t:<24} {d['diff']:+7.2f}  [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]")
        out["bootstrap"] = b.to_json()
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.scoring.mcqa import split_records
    from anomalyclaw.eval.scoring.metrics import (bootstrap_columns, column, evaluate, expert_weight_choice,
                                                  has_expert_scores, kept)
    from anomalyclaw.eval.scoring.tables import format_table
    from anomalyclaw.scores import DEFAULT_EXPERT_WEIGHT

    if args.plots:
        from .paths import writable_folder
        writable_folder(args.plots, "--plots folder")
    records, read = _read_for_eval(args.path, args.merge)
    if not records:
        raise ValueError(f"{args.path}: no readable records (see above); eval reads records.jsonl (JSON lines) or "
                         "released D*.json arrays")
    problems = [] if read.clean else [f"{args.path}: " + "; ".join(read.messages())]
    if args.domains:
        wanted = set(_names(args.domains) or [])
        records = [r for r in records if (r.domain_code or r.domain) in wanted]
        print(f"domains {', '.join(sorted(wanted))}: {len(records)} records")
    # Score records and multiple-choice records are evaluated separately, never mixed: the AUROC
    # filter leaves MCQ records out (mode 'mcqa'), and only they reach the MCQ scorer.
    mcq_records = split_records(records)[1]
    mcqa = _mcqa_report(mcq_records, args) if mcq_records else None
    if mcq_records and len(mcq_records) == len(records):
        if args.json:
            _print_json({"rows": read.rows, "kept": 0, "mcqa": mcqa, **read.to_json()})
        return _strict_exit(args, problems)
    join = None
    if args.expert_scores:
        from anomalyclaw.eval.scoring.external import join_experts, read_expert_scores

        sources = [read_expert_scores(p) for p in args.expert_scores]
        for s in sources:
            for line in s.messages():
                print(line, file=sys.stderr)
        problems += [f"{s.path}: " + "; ".join(s.messages()) for s in sources if s.messages()]
        join = join_experts(records, sources, kept_ids=[r.item_id for r in kept(records)],
                            norm=args.expert_norm, missing=args.expert_missing)
        for line in join.describe():
            print(line)
    expert = join.units if join else None
    has_expert = has_expert_scores(records, expert)
    calibration = None
    if args.calibration:  # read once: it may choose the weight and the threshold
        calibration, cal_read = _read_for_eval(args.calibration, args.merge, " calibration")
        problems += [] if cal_read.clean else [f"{args.calibration}: " + "; ".join(cal_read.messages())]
    if args.expert_weight is None and calibration is not None:
        from anomalyclaw.eval.scoring.weights import choose_expert_weight

        weight, tried = choose_expert_weight(calibration, alpha=args.alpha)
        why = "chosen on calibration"
        print("expert weight chosen on calibration: " + f"{weight:.2f} (macro fused AUROC there: "
              + ", ".join(f"{w:.2f}: {a:.4f}" for w, a in tried.items()) + ")")
    else:
        weight, why = expert_weight_choice(records, args.expert_weight, expert)
        why = "--expert-weight" if why == "given" else why
    if has_expert:
        print(f"expert weight {weight:g} ({why}; --expert-weight 0 gives the paper's two-branch blend)")
    require = bool(join and join.require_expert)
    result = evaluate(records, alpha=args.alpha, expert_weight=weight, expert=expert, require_expert=require)
    # Account for every row of the files: rows = kept + everything left out, with the reason.
    if read.unreadable:
        result["left_out"]["unreadable"] = len(read.unreadable)
    if read.duplicates:
        result["left_out"]["replaced by a later record of the same item"] = len(read.duplicates)
    if args.domains:
        result["left_out"]["other domains"] = read.rows - len(read.unreadable) - len(read.duplicates) - len(records)
    result["rows"] = read.rows
    fusion = dict(expert_weight=weight, expert=expert, require_expert=require)
    threshold = args.threshold
    if threshold is None and calibration is not None:
        from anomalyclaw.eval.scoring.thresholds import choose_threshold

        # The threshold is chosen on the same fused column this evaluation reports (same weight).
        threshold, f1 = choose_threshold(calibration, lambda r: column(r, "fused", args.alpha, weight))
        print(f"image threshold chosen on calibration (F1-max of the fused score): {threshold:.4f} "
              f"(F1 there {f1:.4f})")
    boots = []
    if args.compare:
        other, other_read = _read_for_eval(args.compare, args.merge, " compare")
        problems += [] if other_read.clean else [f"{args.compare}: " + "; ".join(other_read.messages())]
        for col in result["macro_auroc"]:
            if col == "expert":
                continue
            boots.append(bootstrap_columns(records, col, col, alpha=args.alpha, other=other,
                                           n_boot=args.bootstrap or 1000, seed=args.seed, **fusion))
    elif args.bootstrap and result["kept"]:
        pairs = [("blend", "direct"), ("blend", "refute"), ("direct", "refute")]
        if weight and has_expert:
            pairs.insert(0, ("fused", "blend"))
        for a, b in pairs:
            boots.append(bootstrap_columns(records, a, b, alpha=args.alpha, n_boot=args.bootstrap,
                                           seed=args.seed, **fusion))
    swept = ties = None
    if args.sweep and has_expert:
        from anomalyclaw.eval.scoring.weights import sweep, tie_breaking_share

        swept = sweep(records, alpha=args.alpha, expert=expert, require_expert=require)
        ties = tie_breaking_share(records, weight or DEFAULT_EXPERT_WEIGHT, alpha=args.alpha, expert=expert,
                                  require_expert=require)
    print(f"rows {result['rows']}, kept {result['kept']}")
    print(format_table(result))
    if swept:
        print("expert weight sweep, macro fused AUROC: " + ", ".join(f"{w:g}: {a:.4f}" for w, a in swept.items()))
        print(f"tie breaking alone (weight 1e-06): {ties['tie_break']:.4f}, {ties['tie_break_gain']:+.4f} of the "
              f"{ties['gain']:+.4f} gain at weight {weight or DEFAULT_EXPERT_WEIGHT:g} ({ties['share']:.0%})")
    decision = pixel = None
    if threshold is not None:
        from anomalyclaw.eval.scoring.thresholds import decision_metrics, format_decision_table

        decision = decision_metrics(records, threshold,
                                    lambda r: column(r, "fused", args.alpha, weight, expert))
        print(format_decision_table(decision))
    if args.manifest:
        pixel = _pixel_metrics(records, args.manifest, Path(args.path))
    for b in boots:
        print(f"{b.a} - {b.b}: {b.diff:+.4f}  {int(b.level * 100)}% CI [{b.ci_low:+.4f}, {b.ci_high:+.4f}]"
              f"  P(diff<=0)={b.p_le_zero:.3f}  ({b.n_items} paired items, {b.n_boot} resamples)")
    if args.plots:
        from anomalyclaw.eval.reports.plots import plot_domain_bars, plot_roc_curves
        roc = plot_roc_curves(records, Path(args.plots) / "roc_curves.png", alpha=args.alpha, **fusion)
        bars = plot_domain_bars(result, Path(args.plots) / "domain_auroc.png")
        print(f"plots: {roc} {bars}")
    if args.json:
        out = {k: result[k] for k in ("rows", "kept", "left_out", "macro_auroc", "per_domain")}
        out.update(read.to_json())
        out["expert_weight"] = weight
        if join:
            out.update(expert_coverage=join.coverage_json(), expert_norm=join.norm, expert_missing=join.missing)
        if boots:
            out["bootstrap"] = [b.to_json() for b in boots]
        if swept:
            out.update(sweep={f"{w:g}": a for w, a in swept.items()}, tie_breaking=ties)
        if mcqa is not None:
            out["mcqa"] = mcqa
        if decision is not None:
            out["decision"] = decision
        if pixel is not None:
            out["pixel"] = pixel
        _print_json(out)
    return _strict_exit(args, problems)


def _strict_exit(args: argparse.Namespace, problems: list[str]) -> int:
    if args.strict and problems:
        print(f"anomalyclaw eval: --strict: not every row was read as written ({'; '.join(problems)})",
              file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _pixel_metrics(records, manifest: str, path: Path) -> dict | None:
    """Pixel AUROC / AUPRO / box hits of a run's maps against the manifest's masks (printed)."""
    from anomalyclaw.eval.data.manifests import read_manifest
    from anomalyclaw.eval.scoring.pixels import evaluate_pixels, format_pixel_table

    items = {it.item_id: it for it in read_manifest(manifest).items}
    if not any(getattr(items.get(r.item_id), "mask_path", None) for r in records):
        print(f"pixel metrics: no record's item has a mask in {manifest}; nothing to score")
        return None
    if not any(r.localization for r in records):
        print("pixel metrics: the records carry no localization (run before maps existed?); nothing to score")
        return None
    pixel = evaluate_pixels(records, items, path if path.is_dir() else path.parent)
    print(format_pixel_table(pixel))
    return pixel


# --------------------------------------------------------------------------------- data sets
def cmd_synth(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.data.synth import generate_benchmark

    start = time.perf_counter()
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    manifest = generate_benchmark(args.out, seed=args.seed, n_test_per_domain=args.n_test, size=args.size,
                                  n_calibration=args.n_calibration, n_dev=args.n_dev, domains=domains,
                                  workers=args.workers)
    items = _count_items(manifest)
    print(f"wrote {items} items to {manifest} in {time.perf_counter() - start:.1f} s")
    if args.mmad:
        from anomalyclaw.eval.data.synth.mmad import write_mmad_questions

        questions = write_mmad_questions(manifest, seed=args.seed)
        data = json.loads(questions.read_text(encoding="utf-8"))
        n = sum(len(v["conversation"]) for v in data.values())
        print(f"wrote {n} MMAD-format questions about {len(data)} test images to {questions}")
    return 0


def _names(text: str | None) -> list[str] | None:
    """A comma-separated flag value as a list (None when not given)."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _count_items(manifest: Path) -> int:
    return len(json.loads(Path(manifest).read_text()))


def cmd_import_folder(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.data.folders import import_mvtec_folder

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    manifest = import_mvtec_folder(args.root, args.out, n_refs=args.n_refs, seed=args.seed, categories=categories,
                                   traits=_parse_traits(args.traits))
    rows = json.loads(Path(manifest).read_text())
    print(f"wrote {len(rows)} items to {manifest}")
    cards = {r.get("category"): r.get("domain_card", {}).get("traits", []) for r in rows}
    for category, traits in cards.items():
        print(f"  {category}: traits {', '.join(traits) or 'none'}")
    print("  (change with --traits CATEGORY=TRAIT,TRAIT or --traits TRAIT,TRAIT for every category; the traits "
          "decide which tools apply)")
    return 0


def _parse_traits(values: Sequence[str] | None) -> dict[str, list[str]] | None:
    """``--traits texture`` (every category) and ``--traits cable=object,aligned`` (one)."""
    if not values:
        return None
    out: dict[str, list[str]] = {}
    for value in values:
        category, sep, names = value.partition("=")
        key = category.strip() if sep else "*"
        traits = [t.strip() for t in (names if sep else value).split(",") if t.strip()]
        if sep and not key:
            raise ValueError(f"--traits {value!r}: expected CATEGORY=TRAIT,TRAIT or TRAIT,TRAIT")
        out[key] = traits
    return out


# --------------------------------------------------------------------------------------- runs
def _agent_config(args: argparse.Namespace):
    from .config import AgentConfig

    return AgentConfig().with_(max_turns=args.max_turns, alpha=args.alpha, direct_score=args.direct_score,
                               backbone=args.backbone, backbone_path=args.backbone_path,
                               image_history=args.image_history, expert_weight=args.expert_weight,
                               image_side=args.image_side, tool_calling=args.tool_calling)


def _registry(args: argparse.Namespace):
    from anomalyclaw.tools.registry import ToolRegistry

    registry = ToolRegistry.default()
    for name in filter(None, (args.drop_tools or "").split(",")):
        registry.drop(name.strip())
    return registry


def _make_vlm(args: argparse.Namespace):
    from anomalyclaw.graph.vlm import make_vlm

    from .config import EndpointConfig, install_secret_redaction

    if args.backend == "offline":
        return make_vlm("offline", max_concurrency=args.concurrency), []
    endpoint = EndpointConfig.from_env(preset=args.preset, base_url=args.base_url, model=args.model,
                                       timeout_s=args.timeout, client=args.client,
                                       transport=args.transport).require()
    install_secret_redaction(endpoint.secret_values())
    from anomalyclaw.graph.vlm.endpoint import check_endpoint

    check_endpoint(endpoint)  # one cheap request: a wrong URL or key stops here, before any item
    return make_vlm("openai", endpoint, max_concurrency=args.concurrency), endpoint.secret_values()


def _command_line(argv: Sequence[str] | None) -> list[str]:
    """The command line as typed, for ``run_*.json`` (the key never comes from a flag; a URL's
    password is blanked)."""
    import re

    words = ["anomalyclaw", *(sys.argv[1:] if argv is None else argv)]
    return [re.sub(r"(://[^/:@\s]*):[^@/\s]*@", r"\1:***@", w) for w in words]


def _check_item_files(items, where: str) -> None:
    """Before the first request: when none of the first items' images exist, the data root or
    the manifest's paths are wrong; say so once instead of writing an error record per item."""
    from anomalyclaw.eval.data.manifests import check_files, data_root_from_env

    head = items[:5]
    missing = check_files(head, n=len(head))
    if not missing:
        return
    item, field, path = missing[0]
    if len({m[0].item_id for m in missing}) == len(head):
        root = data_root_from_env()
        hint = f"ANOMALYCLAW_DATA is {root}" if root else "ANOMALYCLAW_DATA is not set"
        raise AnomalyClawError(f"the images of the first {len(head)} items of {where} do not exist (item "
                               f"{item.item_id!r}, {field}: {path}); are the paths right? ({hint})")
    print(f"warning: {len(missing)} image file(s) of the first {len(head)} items do not exist (item "
          f"{item.item_id!r}, {field}: {path}); those items get error records", file=sys.stderr)


def _prepare_run(args: argparse.Namespace, items, out_dir: Path, where: str, inputs: dict, *,
                 replace: bool = False):
    """Everything that can be checked before the first request, then the Runner: items to
    judge, image files, the output folder, the endpoint."""
    from anomalyclaw.eval.running.runner import Runner
    from anomalyclaw.prompts import PromptSet

    from .paths import writable_folder

    if not items:
        raise AnomalyClawError(f"{where} holds no items to judge")
    _check_item_files(items, where)
    writable_folder(out_dir, "run folder")
    config, registry, prompts = _agent_config(args), _registry(args), PromptSet.load(args.prompts)
    threshold = _run_threshold(args)
    scale = _scale_options(args)
    vlm, secrets = _make_vlm(args)
    kwargs = dict(out_dir=out_dir, config=config, registry=registry, prompts=prompts,
                  save_images=args.save_images, save_maps=not getattr(args, "no_maps", False),
                  threshold=threshold, progress=not args.no_progress, secrets=secrets,
                  source=inputs.get("manifest"), inputs=inputs, command=_command_line(getattr(args, "argv", None)))
    if scale:
        from anomalyclaw.eval.running.workers import ShardedRunner

        return ShardedRunner(vlm, **scale, **kwargs)
    return Runner(vlm, **kwargs)


def _scale_options(args: argparse.Namespace) -> dict:
    """``--workers`` / ``--ray`` as ShardedRunner's arguments ({} for one process), checked
    before anything starts."""
    workers, ray = getattr(args, "workers", None), getattr(args, "ray", None)
    if ray is None and (workers is None or workers == 1):
        return {}
    from anomalyclaw.eval.running.workers import import_ray, split_concurrency

    if ray is not None:
        import_ray()  # without Ray installed: one line saying how to install it
    workers = workers or 2
    split_concurrency(args.concurrency, workers)  # the check ShardedRunner makes, before the endpoint's
    return {"workers": workers, "ray": ray if ray is not None else False}


def _run(args: argparse.Namespace, items, rejected, out_dir: Path, *, where: str, inputs: dict,
         lock=None, duplicates: int = 0) -> tuple[dict, int]:
    """Run items, print the summary and the evaluation; returns the --json object and the
    exit status."""
    from anomalyclaw.eval.scoring.metrics import evaluate
    from anomalyclaw.eval.running.records import RECORDS_FILE, load_records
    from anomalyclaw.eval.running.runner import run_sync
    from anomalyclaw.eval.scoring.tables import format_table

    runner = _prepare_run(args, items, out_dir, where, inputs)
    vlm = runner.vlm
    summary = run_sync(runner, items, rejected=rejected, resume=args.resume, retry_errors=args.retry_errors,
                       force=args.force, handle_signals=True, lock=lock,
                       duplicates=duplicates, loop=getattr(args, "loop", None))
    ids = {it.item_id for it in items} | set(rejected)
    try:
        records = [r for r in load_records(out_dir / RECORDS_FILE) if r.item_id in ids]
    except (OSError, ValueError) as exc:  # the records file itself is what failed (summary.fatal says how)
        log.warning("cannot read the records back: %s", exc)
        records = []
    weight = runner.config.expert_weight if runner.config.expert_score else 0.0
    result = evaluate(records, alpha=runner.config.alpha, expert_weight=weight)
    per_item = summary.requests / summary.n_done if summary.n_done else 0.0
    print(f"\n{summary.n_done} items judged in {summary.elapsed_s:.1f} s ({summary.items_per_s:.2f} items/s), "
          f"{summary.n_skipped} already done, {summary.n_errors} errors, {summary.n_partial} judged by one "
          f"branch only, {summary.n_duplicates} duplicate ids left out; backend {vlm.backend} ({vlm.model}); "
          f"{per_item:.2f} VLM requests per item; records: {out_dir / RECORDS_FILE}")
    if summary.tool_calling != "json":
        print(f"tool calling: {summary.tool_calling}")
    if len(summary.replicas) > 1:
        print(format_replicas(summary.replicas))
    if result["kept"]:
        print(format_table(result))
    n_errors = sum(1 for r in records if r.error)
    status, errors = _run_status(args, summary, records, out_dir)
    out = {k: result[k] for k in ("rows", "kept", "macro_auroc", "per_domain")}
    out.update(n_items=len(records), n_errors=n_errors,
               records=str(out_dir / RECORDS_FILE), items_per_s=summary.items_per_s,
               n_partial=summary.n_partial, n_duplicates=summary.n_duplicates,
               requests_per_item=round(per_item, 3), backend=vlm.backend, fatal=summary.fatal,
               tool_calling=summary.tool_calling, interrupted=summary.interrupted, replicas=summary.replicas,
               top_errors=[{"count": c, "error": m} for c, m in errors],
               exit_status=status)
    return out, status


def format_replicas(rows) -> str:
    """One line per endpoint replica: requests, errors, latency of successful requests, state."""
    def ms(v):
        return f"{1000 * v:.0f}" if v is not None else "-"
    lines = [f"{'replica':<40} {'requests':>8} {'errors':>6} {'mean ms':>8} {'p50 ms':>7} {'p95 ms':>7} {'rests':>5}  state"]
    for r in rows:
        lines.append(f"{r['url'][:40]:<40} {r['requests']:>8} {r['errors']:>6} {ms(r['latency_mean_s']):>8} "
                     f"{ms(r['latency_p50_s']):>7} {ms(r['latency_p95_s']):>7} {r['rests']:>5}  {r['state']}")
    return "\n".join(lines)


def _run_status(args: argparse.Namespace, summary, records, out_dir: Path) -> tuple[int, list[tuple[int, str]]]:
    """The exit status of a finished run, after saying on stderr why it is not 0 (and, when
    some items errored, their most common reasons); also returns those reasons."""
    from anomalyclaw.eval.running.records import RECORDS_FILE
    from anomalyclaw.eval.running.runner import top_errors

    n_errors = sum(1 for r in records if r.error)
    errors = top_errors(records)
    status = EXIT_OK
    if summary.interrupted:
        status = EXIT_TERMINATED if summary.interrupted == "SIGTERM" else EXIT_INTERRUPTED
        print(f"interrupted ({summary.interrupted}): {len(records)} records are kept in {out_dir / RECORDS_FILE}"
              f"{f', {summary.n_abandoned} items in flight were abandoned' if summary.n_abandoned else ''}; "
              + ("rerun with --resume to judge the rest" if args.command == "run" else "run it again"),
              file=sys.stderr)
    elif summary.fatal:
        status = EXIT_UNAVAILABLE
        print(f"run stopped: {summary.fatal}", file=sys.stderr)
    elif records and n_errors == len(records):
        status = EXIT_ALL_ERRORS
        print(f"every item errored ({n_errors} of {len(records)}); the most common reasons:", file=sys.stderr)
    elif n_errors:
        print(f"{n_errors} of {len(records)} items errored; the most common reasons:", file=sys.stderr)
    if errors and not summary.interrupted and not summary.fatal:
        for count, message in errors:
            print(f"  {count:>5} x {message[:300]}", file=sys.stderr)
        if status == EXIT_ALL_ERRORS and getattr(args, "resume", False) and not args.retry_errors \
                and summary.n_skipped:
            print("  --resume skips items that already have a record, error records included: add --retry-errors "
                  "to judge those items again", file=sys.stderr)
    return status, errors


def _manifest_inputs(manifest: Path, split: str | None, domains: list[str] | None) -> dict:
    """The part of a run folder's fingerprint that says which items it judges."""
    import hashlib

    return {"manifest": str(manifest), "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "split": split.lower() if split else None,
            "domains": sorted({d.lower() for d in domains}) if domains else None}


def _run_mcqa(args: argparse.Namespace) -> int:
    """``run --task mcqa``: every question of an MMAD file, then the multiple-choice tables."""
    from anomalyclaw.eval.data.mmad import read_mmad
    from anomalyclaw.eval.running.mcqa import McqRunner
    from anomalyclaw.eval.running.records import RECORDS_FILE, load_records
    from anomalyclaw.eval.running.runner import run_sync
    from anomalyclaw.prompts import PromptSet

    if getattr(args, "workers", None) not in (None, 1) or getattr(args, "ray", None) is not None:
        flag = "--ray" if getattr(args, "ray", None) is not None else f"--workers {args.workers}"
        raise ValueError(f"{flag} applies to --task score; --task mcqa runs in one process (leave {flag.split()[0]} "
                         "out)")
    if args.split:
        raise ValueError("--split does not apply to --task mcqa: an MMAD file has no splits (use --domains to pick "
                         "its datasets, e.g. DS-MVTec,VisA)")
    if args.tool_calling not in (None, "json"):
        raise ValueError(f"--tool-calling {args.tool_calling} applies to the score task; the multiple-choice task's "
                         "refutation names its tools in JSON actions (leave --tool-calling out)")
    contents = read_mmad(args.manifest, data_root=args.data_root, refs=args.mmad_refs, n_refs=args.mmad_shots,
                         domain_knowledge=args.domain_knowledge, datasets=_names(args.domains))
    for where, fld, msg in contents.problems[:20]:
        print(f"manifest problem: {where}: field '{fld}': {msg}", file=sys.stderr)
    if contents.problems and args.strict:
        print(f"{len(contents.problems)} problems in {contents.source}; --strict refuses to start", file=sys.stderr)
        return 2
    if args.limit:
        contents = contents.limited(args.limit)
    print(f"{contents.n_questions} questions about {len(contents.images)} images "
          f"({len(contents.rejected)} rejected) from {contents.source}; data root {contents.data_root}; "
          f"references: the first {contents.n_refs} of each image's {contents.refs}_templates")
    out_dir = Path(args.out)
    from .paths import writable_folder

    writable_folder(out_dir, "run folder")
    vlm, secrets = _make_vlm(args)
    source = Path(contents.source).resolve()
    inputs = {**_manifest_inputs(source, None, _names(args.domains)), "mmad_refs": contents.refs,
              "mmad_shots": contents.n_refs, "domain_knowledge": args.domain_knowledge}
    runner = McqRunner(vlm, out_dir=out_dir, config=_agent_config(args), registry=_registry(args),
                       prompts=PromptSet.load(args.prompts), save_images=args.save_images,
                       progress=not args.no_progress, secrets=secrets, source=contents.source,
                       inputs=inputs, command=_command_line(args.argv),
                       mmad_info={"data_root": str(contents.data_root), "refs": contents.refs,
                                  "n_refs": contents.n_refs, "domain_knowledge": args.domain_knowledge})
    summary = run_sync(runner, contents.images, rejected=contents.rejected, resume=args.resume,
                       retry_errors=args.retry_errors, force=args.force, handle_signals=True,
                       loop=getattr(args, "loop", None))
    records = load_records(out_dir / RECORDS_FILE)
    per_q = summary.requests / summary.n_done if summary.n_done else 0.0
    stand_in = " (the rule-based stand-in, not a VLM)" if vlm.backend == "offline" else ""
    print(f"\n{summary.n_done} questions answered in {summary.elapsed_s:.1f} s ({summary.items_per_s:.2f} "
          f"questions/s), {summary.n_skipped} already done, {summary.n_errors} errors; backend {vlm.backend} "
          f"({vlm.model}){stand_in}; {per_q:.2f} VLM requests per question; records: {out_dir / RECORDS_FILE}")
    mcqa = _mcqa_report([r for r in records if r.mode == "mcqa"], argparse.Namespace(bootstrap=0))
    status, _ = _run_status(args, summary, records, out_dir)
    if args.json:
        _print_json({"task": "mcqa", "mcqa": mcqa, "n_questions": len(records),
                     "n_errors": sum(1 for r in records if r.error), "records": str(out_dir / RECORDS_FILE),
                     "questions_per_s": summary.items_per_s, "requests_per_question": round(per_q, 3),
                     "backend": vlm.backend, "fatal": summary.fatal, "interrupted": summary.interrupted,
                     "exit_status": status})
    return status


def _run_threshold(args: argparse.Namespace) -> float | None:
    """``--threshold X``, or the F1-max threshold of ``--threshold-from`` records' anomaly_score."""
    if getattr(args, "threshold_from", None):
        from anomalyclaw.eval.running.records import load_records
        from anomalyclaw.eval.scoring.thresholds import choose_threshold

        threshold, f1 = choose_threshold(load_records(args.threshold_from))
        print(f"image threshold from {args.threshold_from} (F1-max of anomaly_score): {threshold:.4f} "
              f"(F1 there {f1:.4f})")
        return threshold
    return getattr(args, "threshold", None)


def cmd_run(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.data.manifests import read_manifest, resolve_manifest_path
    from anomalyclaw.loops import resolve_loop

    resolve_loop(args.loop)  # an unknown ANOMALYCLAW_LOOP, or uvloop asked for and missing: before any work
    if args.task == "mcqa":
        return _run_mcqa(args)
    if getattr(args, "workers", None) not in (None, 1) and getattr(args, "ray", None) is None:
        from anomalyclaw.eval.running.forkserver import start_worker_server

        # First of all: the workers' fork server then imports what they need (~3.8 s of CPU)
        # while this process reads the manifest and imports the runner, not after.
        start_worker_server()

    domains = [d.strip() for d in (args.domains or "").split(",") if d.strip()] or None
    contents = read_manifest(args.manifest, split=args.split, domains=domains)
    items = contents.items[: args.limit] if args.limit else contents.items
    if contents.problems:
        for where, fld, msg in contents.problems[:20]:
            print(f"manifest problem: {where}: field '{fld}': {msg}", file=sys.stderr)
        if args.strict:
            print(f"{len(contents.problems)} manifest problems; --strict refuses to start", file=sys.stderr)
            return EXIT_USAGE
    rejected = {} if args.limit else contents.rejected
    manifest = resolve_manifest_path(args.manifest).resolve()
    out, status = _run(args, items, rejected, Path(args.out), where=str(manifest),
                       inputs=_manifest_inputs(manifest, args.split, domains),
                       duplicates=0 if args.limit else contents.n_duplicates)
    if args.json:
        _print_json(out)
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.data.manifests import read_manifest
    from anomalyclaw.eval.running.records import RECORDS_FILE, RunLock

    root = Path(args.out)
    run_dir = root / "run"
    # The lock first, always: a second demo must be refused before it touches the running one's
    # records; the runner then runs under this lock.
    with RunLock(run_dir) as lock:
        manifest = root / "synth" / "manifest.json"
        if not manifest.exists():
            print(f"generating the synthetic benchmark in {manifest.parent} ...")
            cmd_synth(build_parser().parse_args(["synth", "--out", str(manifest.parent), "--seed", str(args.seed)]))
        for stale in [run_dir / RECORDS_FILE, *run_dir.glob("run_*.json")]:
            stale.unlink(missing_ok=True)  # the demo always starts fresh in its own folder
        contents = read_manifest(manifest, split="test")
        out, status = _run(args, contents.items, contents.rejected, run_dir, where=str(manifest.resolve()),
                           inputs=_manifest_inputs(manifest.resolve(), "test", None), lock=lock)
    if args.json:
        _print_json(out)
    return status


def cmd_predict(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.running.predict import KIND, domain_card, format_prediction, predict_items, prediction
    from anomalyclaw.eval.running.records import RECORDS_FILE, load_records
    from anomalyclaw.eval.running.runner import run_sync

    traits = [t.strip() for t in args.traits.split(",") if t.strip()] if args.traits is not None else None
    card = domain_card(args.domain_card, traits)
    items = predict_items(args.query, args.refs, card)
    out_dir = Path(args.out)
    args.save_images, args.resume, args.retry_errors, args.force = True, False, False, False
    runner = _prepare_run(args, items, out_dir, " ".join(args.query), {"kind": KIND, "card": card.to_json()})
    summary = run_sync(runner, items, replace=True, handle_signals=True)
    records = {r.item_id: r for r in load_records(out_dir / RECORDS_FILE)}
    preds = [prediction(records[it.item_id], it, out_dir) for it in items if it.item_id in records]
    for pred in preds:
        print(format_prediction(pred))
    n_refs = len({r for it in items for r in it.ref_paths})
    print(f"{len(preds)} image(s) judged by {runner.vlm.backend} ({runner.vlm.model}) against {n_refs} reference "
          f"image(s); records and tool images in {out_dir}")
    status = EXIT_OK
    if summary.interrupted:
        status = EXIT_TERMINATED if summary.interrupted == "SIGTERM" else EXIT_INTERRUPTED
        print(f"interrupted ({summary.interrupted})", file=sys.stderr)
    elif summary.fatal:
        status = EXIT_UNAVAILABLE
        print(f"stopped: {summary.fatal}", file=sys.stderr)
    elif preds and all(p["error"] for p in preds):
        status = EXIT_ALL_ERRORS
    if args.json:
        _print_json({"predictions": preds, "out": str(out_dir), "exit_status": status})
    return status


def cmd_bench(args: argparse.Namespace) -> int:
    from anomalyclaw.scores import DEFAULT_EXPERT_WEIGHT

    if args.bench_command == "experts":
        from anomalyclaw.eval.bench.experts import format_table as format_experts
        from anomalyclaw.eval.bench.experts import positional_params, run_expert_benchmark

        started = time.perf_counter()
        result = run_expert_benchmark(args.manifest, None if args.split == "all" else args.split, args.backbone,
                                      backbone_path=args.backbone_path, device=args.device,
                                      domains=_names(args.domains), expert_params=positional_params(args.positional),
                                      held_out=args.held_out)
        print(format_experts(result))
        print(f"{result['items']} items, backbone {args.backbone}, pool {result['pool']}, "
              f"{time.perf_counter() - started:.1f} s")
    elif args.bench_command == "tool-calling":
        from anomalyclaw.eval.bench.toolcalling import format_tool_calling, run_tool_calling_bench

        items = None
        if args.manifest:
            from anomalyclaw.eval.data.manifests import load_manifest

            items = load_manifest(args.manifest, split=args.split)[: args.limit]
        result = run_tool_calling_bench(items, client=args.client)
        print(format_tool_calling(result))
    elif args.bench_command == "requests":
        from anomalyclaw.eval.bench.requests import format_requests, request_cpu

        result = {"requests": request_cpu(clients=args.client.split(","), transports=args.transport.split(","),
                                          requests=args.requests, concurrency=args.concurrency, rounds=args.rounds)}
        print(format_requests(result["requests"]))
    elif args.bench_command == "start":
        from anomalyclaw.eval.bench.start import bench_start, format_start

        result = bench_start(args.items, rounds=args.rounds, workers=args.workers, concurrency=args.concurrency)
        print(format_start(result))
    elif args.bench_command == "memory":
        from anomalyclaw.eval.bench.memory import format_memory, run_memory_bench

        result = run_memory_bench(args.items, baseline_items=args.baseline_items, image_size=args.size,
                                  concurrency=args.concurrency)
        print(format_memory(result))
    elif args.bench_command == "fusion":
        from anomalyclaw.eval.bench.fusion import format_fusion, run_fusion_benchmark

        started = time.perf_counter()
        result = run_fusion_benchmark(args.dir, seed=args.seed, synth_manifest=args.synth, only=args.only,
                                      weight=DEFAULT_EXPERT_WEIGHT if args.weight is None else args.weight)
        print(format_fusion(result))
        print(f"benchmarks and runs in {args.dir}, {time.perf_counter() - started:.1f} s")
    elif args.bench_command == "profile":
        from anomalyclaw.eval.bench.profile import format_passes, format_profile, profile_run

        slots = [None] if args.compute_slots is None else args.compute_slots
        intra = args.intra_op_threads
        clients, transports = args.client.split(","), args.transport.split(",")
        result = {"profiles": [profile_run(n_items=args.items, concurrency=args.concurrency, latency_s=args.latency,
                                           client=client, transport=transport, image_size=args.size,
                                           new_sets=args.new_sets, compute_slots=n, intra_op_threads=t)
                               for _ in range(args.rounds) for client in clients for transport in transports
                               for n in slots for t in intra]}
        print("\n\n".join(format_profile(r) for r in result["profiles"]))
        if len(result["profiles"]) > len(clients):
            print("\n" + format_passes(result["profiles"]))
    elif args.bench_command == "slots":
        from anomalyclaw.eval.bench.slots import bench_slots, format_slots

        result = bench_slots(args.compute_slots, rounds=args.rounds, n_items=args.items,
                             concurrency=args.concurrency, latency_s=args.latency)
        print(format_slots(result))
    elif args.bench_command == "tools":
        from anomalyclaw.eval.bench.tools import evaluate_tools, format_latency, format_quality, run_tool_benchmark

        tools = _names(args.tools)
        if args.manifest:
            result = evaluate_tools(args.manifest, tools=tools, split=args.split, domains=_names(args.domains))
            print(format_quality(result))
        else:
            result = run_tool_benchmark(args.size, args.repeats, tools=tools)
            print(format_latency(result, args.size, args.repeats))
    else:
        from anomalyclaw.eval.bench.throughput import format_bench, full_plan, quick_plan, run_bench, scale_plan

        if args.bench_command == "scale":
            plan = scale_plan(args.concurrency, _names(args.modes), args.items, _names(args.transport),
                              _names(args.loop))
        else:
            plan = quick_plan() if args.quick else full_plan()
        result = run_bench(plan)
        print(format_bench(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
        print(f"results: {args.out}")
    if args.json:
        _print_json(result)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.running.records import load_records
    from anomalyclaw.eval.reports.trace import format_trace

    records = {r.item_id: r for r in load_records(args.records)}
    if args.item not in records:
        some = ", ".join(sorted(records)[:5])
        raise ValueError(f"no record for item {args.item!r} in {args.records} ({len(records)} records, e.g. {some})")
    rec = records[args.item]
    if args.json:
        print(rec.to_line())
    else:
        print(format_trace(rec))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from anomalyclaw.eval.reports.html import build_report

    from .paths import writable_folder

    if args.out:
        writable_folder(Path(args.out).expanduser().parent, "report folder")
    elif Path(args.run).is_dir():
        writable_folder(args.run, "report folder (the run folder)")

    page = build_report(args.run, args.out, item_ids=args.item, manifest=args.manifest,
                        embed_images=not args.link_images, alpha=args.alpha)
    print(f"report: {page}")
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.tools_command == "run":
        return _cmd_tools_run(args, registry)
    catalog = registry.describe()
    if args.json:
        print(json.dumps(catalog))
        return 0
    for entry in catalog:
        print(f"{entry['name']:<22} [{entry['family']}] {entry['specialty']}")
        print(f"{'':<22} applies to: {entry['applicability']}")
        print(f"{'':<22} args: {json.dumps(entry['args'])}")
    return 0


def _cmd_tools_run(args: argparse.Namespace, registry) -> int:
    from anomalyclaw.eval.data.manifests import read_manifest
    from anomalyclaw.tools.registry import run_tool_on_item

    contents = read_manifest(args.manifest)
    item = next((it for it in contents.items if it.item_id == args.item), None)
    if item is None:
        if args.item in contents.rejected:
            raise ValueError(f"item {args.item!r} is invalid: {'; '.join(contents.rejected[args.item])}")
        raise ValueError(f"no item {args.item!r} in {args.manifest}")
    try:
        tool_args = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--args is not JSON: {exc}") from None
    obs = run_tool_on_item(args.name, item, tool_args, out_dir=args.out, registry=registry)
    print(obs.text)
    if args.out and obs.images:
        print(f"images: {', '.join(im.name for im in obs.images)} in {args.out}")
    if args.json:
        print(json.dumps(obs.to_json()))
    return EXIT_OK if obs.ok else EXIT_CHECK_FAILED


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyclaw", description="AnomalyClaw: training-free visual anomaly detection by tool-grounded refutation.")
    from .config import CLIENTS, TRANSPORTS
    from .loops import LOOPS
    from .version import __version__

    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: this project's log lines (requests, retries, tool calls); -vv: their details "
                             "and the HTTP clients' lines; -vvv: every library's debug output")
    parser.add_argument("--version", action="version", version=f"anomalyclaw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="AUROC per domain and branch from a folder of records")
    p.add_argument("path", help="folder with records.jsonl (this project) or D*.json (released), or a file")
    p.add_argument("--alpha", type=FRACTION, default=0.5, help="fusion weight of the direct branch, 0-1 (default 0.5)")
    p.add_argument("--bootstrap", type=COUNT, default=0, metavar="N",
                   help="paired bootstrap resamples for confidence intervals of differences (>= 0)")
    p.add_argument("--compare", metavar="OTHER", help="records of another run: bootstrap this - other per column")
    p.add_argument("--seed", type=SEED, default=0, help="bootstrap seed")
    p.add_argument("--expert-weight", type=EXPERT_WEIGHT,
                   help="weight of the frozen-expert term in the fused column (default 0.2 when there are expert "
                        "scores; 0 gives the paper's two-branch blend)")
    p.add_argument("--expert-scores", action="append", metavar="PATH",
                   help="per-item expert scores joined by item_id (repeatable: an ensemble): released baselines "
                        "(baselines/anomalydino), expert caches (expert_cache/anomalyvfm_test.json) or another "
                        "run's records (its expert_score)")
    p.add_argument("--expert-norm", choices=["z", "rank"], default="z",
                   help="label-free per-domain normalisation of --expert-scores: z-score (default) or z-scored ranks")
    p.add_argument("--expert-missing", choices=["drop", "blend"], default="drop",
                   help="items some --expert-scores do not cover: drop them from every column (default), or "
                        "keep them with their blend")
    p.add_argument("--sweep", action="store_true",
                   help="also print the macro fused AUROC at expert weights 0 to 0.5 and the tie-breaking share")
    p.add_argument("--domains", help="comma-separated domain codes to evaluate, e.g. D1,D5 (default: all)")
    p.add_argument("--calibration", metavar="RUN",
                   help="records of a calibration-split run: choose the expert weight there, apply it here")
    p.add_argument("--threshold", type=float, metavar="X",
                   help="image threshold for F1/precision/recall/accuracy (default with --calibration: "
                        "F1-max there)")
    p.add_argument("--manifest", metavar="M", help="the manifest that was run: pixel AUROC, AUPRO and box hit "
                   "rate of the agent's and the expert's maps where it has masks")
    p.add_argument("--plots", metavar="DIR", help="write ROC curves and per-domain bars as PNG here")
    p.add_argument("--merge", action="store_true",
                   help="read a folder that mixes records.jsonl, D*.json and other *.jsonl files (refused otherwise)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a row is unreadable, a label or score is not in an accepted "
                        "form, or a record is replaced by a later one of the same item")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("synth", help="write the synthetic benchmark (images, masks, manifest.json)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--n-test", type=_number(int, 2), default=24, help="test items per domain, >= 2 (default 24)")
    p.add_argument("--n-calibration", type=COUNT, default=8, help="calibration items per domain (default 8)")
    p.add_argument("--n-dev", type=COUNT, default=8, help="dev items per domain (default 8)")
    p.add_argument("--size", type=_number(int, 64, 1024), default=256, help="image side in pixels, 64-1024 (default 256)")
    p.add_argument("--domains", help="comma-separated codes or names, e.g. S1,coin_count (default: all seven)")
    p.add_argument("--workers", type=POSITIVE_INT,
                   help="rendering threads (default: one per core); output does not depend on it")
    p.add_argument("--mmad", action="store_true",
                   help="also write mmad.json: MMAD-format multiple-choice questions on the test images "
                        "(run them with `anomalyclaw run --task mcqa --manifest OUT/mmad.json`)")
    p.set_defaults(handler=cmd_synth)

    p = sub.add_parser("import-folder", help="turn an MVTec-style folder into a manifest")
    p.add_argument("root", help="folder of <category>/train/good, <category>/test/<defect>, [ground_truth]")
    p.add_argument("--out", required=True, help="manifest file to write")
    p.add_argument("--n-refs", type=POSITIVE_INT, default=5, help="references per item, drawn from train/good")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the reference draw")
    p.add_argument("--categories", help="comma-separated category names (default: all)")
    p.add_argument("--traits", action="append", metavar="[CATEGORY=]TRAIT,TRAIT",
                   help="domain-card traits (aligned, texture, object, rotating, counting, ...) for every category, "
                        "or with CATEGORY= for one (repeatable); default: texture for the MVTec texture names, "
                        "else object,aligned")
    p.set_defaults(handler=cmd_import_folder)

    def run_options(p: argparse.ArgumentParser, *, backend_default: str = "offline") -> None:
        g = p.add_argument_group("backend (the API key comes only from the environment)")
        g.add_argument("--backend", choices=["offline", "openai"],
                       help="offline: the embedded rule-based stand-in; openai: any OpenAI-compatible endpoint "
                            f"(default: openai when --preset, --base-url or --model is given, else {backend_default})")
        p.set_defaults(backend_default=backend_default)
        g.add_argument("--preset", choices=["qwen", "gpt", "seed", "openai"],
                       help="read QWEN_API_BASE/QWEN_API_KEY/QWEN_MODEL (or GPT_*, SEED_*, OPENAI_*)")
        g.add_argument("--base-url", action="append",
                       help="endpoint base URL (else ANOMALYCLAW_BASE_URL); give it several times, or comma-separated, "
                            "for replicas of one endpoint: requests go to the one with the fewest in flight")
        g.add_argument("--model", help="model name (else ANOMALYCLAW_MODEL)")
        g.add_argument("--timeout", type=SECONDS,
                       help="total seconds per request: connect, send, whole reply; > 0 (default 120)")
        g.add_argument("--client", choices=["langchain", "sdk"],
                       help="openai backend's client: langchain (ChatOpenAI, default) or sdk (the openai SDK "
                            "directly, less CPU per request); else ANOMALYCLAW_CLIENT")
        g.add_argument("--transport", choices=TRANSPORTS,
                       help="HTTP stack under either client: aiohttp (default) or httpx; else ANOMALYCLAW_TRANSPORT")
        g.add_argument("--concurrency", type=POSITIVE_INT, default=8, help="VLM requests in flight, >= 1 (default 8)")
        a = p.add_argument_group("agent")
        a.add_argument("--max-turns", type=POSITIVE_INT, help="refutation turns before a forced commit, >= 1 (default 3)")
        a.add_argument("--alpha", type=FRACTION, help="fusion weight of the direct branch, 0-1 (default 0.5)")
        a.add_argument("--expert-weight", type=EXPERT_WEIGHT,
                       help="weight of the frozen-expert term in the fused score, >= 0 (default 0.2; 0 gives the "
                            "paper's two-branch blend exactly)")
        a.add_argument("--direct-score", choices=["verbalized", "logprob"], help="direct branch reading")
        a.add_argument("--backbone", help="expert backbone: classic (default), dinov2, clip")
        a.add_argument("--backbone-path", help="local folder of the backbone weights")
        a.add_argument("--image-history", choices=["once", "all"], help="send each image once (default) or every turn")
        a.add_argument("--image-side", type=IMAGE_SIDE, help="longest side of images sent to the VLM, >= 64 (default 768)")
        a.add_argument("--prompts", help="folder of prompt .txt files overriding the defaults")
        a.add_argument("--drop-tools", help="comma-separated tool names to leave out of the catalog")
        a.add_argument("--tool-calling", choices=["json", "native", "auto"],
                       help="json: the tool call is a JSON action in the reply (default, any endpoint); native: "
                            "the model is bound to the tools (needs a tool parser); auto: native, JSON after the "
                            "endpoint refuses tools")
        o = p.add_argument_group("output")
        o.add_argument("--resume", action="store_true", help="skip items already recorded in OUT")
        o.add_argument("--retry-errors", action="store_true", help="with --resume: judge error records again")
        o.add_argument("--force", action="store_true",
                       help="with --resume: continue even when OUT's records were made with other settings")
        o.add_argument("--save-images", action="store_true", help="write tool images under OUT/images")
        o.add_argument("--no-maps", action="store_true",
                       help="do not write anomaly maps under OUT/maps (the boxes are still recorded)")
        t = o.add_mutually_exclusive_group()
        t.add_argument("--threshold", type=float, metavar="X",
                       help="image threshold: every record gets label_pred = anomaly_score >= X")
        t.add_argument("--threshold-from", metavar="CAL_RUN",
                       help="records of a calibration run: label_pred at their F1-max threshold")
        o.add_argument("--no-progress", action="store_true", help="no progress bar")
        o.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("run", help="judge every item of a manifest (or answer every question of an MMAD file); "
                                   "records to OUT/records.jsonl")
    p.add_argument("--task", choices=["score", "mcqa"], default="score",
                   help="score: an anomaly score per image (default); mcqa: MMAD's multiple-choice questions, "
                        "--manifest being an mmad.json")
    p.add_argument("--manifest", required=True, help="manifest file or folder (mcqa: mmad.json or its folder)")
    p.add_argument("--split", help="calibration, dev or test")
    p.add_argument("--domains", help="comma-separated domain codes or names, e.g. D1,D7 (mcqa: datasets, e.g. VisA)")
    p.add_argument("--limit", type=POSITIVE_INT, help="only the first N items, >= 1 (mcqa: questions)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--strict", action="store_true", help="refuse to start when the manifest has problems")
    m = p.add_argument_group("mcqa (MMAD's question file)")
    m.add_argument("--data-root", help="folder the file's image paths are relative to (else ANOMALYCLAW_DATA, its "
                                       "MMAD/ folder, or the file's own folder: the first that holds the images)")
    m.add_argument("--mmad-refs", choices=["random", "similar"], default="random",
                   help="which template list gives the references (default random, as MMAD's protocol)")
    m.add_argument("--mmad-shots", type=POSITIVE_INT, default=1, help="templates per question (default 1, as MMAD's protocol)")
    m.add_argument("--domain-knowledge", metavar="FILE",
                   help="MMAD's domain_knowledge.json: its text for the image's class goes into the domain card")
    run_options(p)
    w = p.add_argument_group("scale (the parent process is the one writer of OUT/records.jsonl)")
    w.add_argument("--workers", type=POSITIVE_INT, metavar="N",
                   help="judge the items in N worker processes, each with its own event loop and a share of "
                        "--concurrency (one machine, CPU-bound); with --ray: N Ray actors (default 2)")
    w.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="judge the items on Ray actors: the cluster at ADDRESS (e.g. ray://head:10001 or auto), "
                        "or a local one when none is given (pip install anomalyclaw[ray])")
    w.add_argument("--loop", choices=LOOPS,
                   help="the event loop: auto (uvloop where installed, else asyncio), uvloop (less of the loop's "
                        "CPU per request) or asyncio; default ANOMALYCLAW_LOOP, else auto; worker processes take "
                        "the parent's")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("demo", help="synthetic benchmark + full pipeline on the offline backend + AUROC")
    p.add_argument("--out", default="anomalyclaw-demo", help="folder for the benchmark and the run")
    p.add_argument("--seed", type=SEED, default=0)
    run_options(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("predict", help="judge one image, or a folder of images, against reference images (no "
                                       "manifest): score, verdicts, boxes, tool images")
    p.add_argument("query", nargs="+", help="query image file(s), or a folder of them")
    p.add_argument("--refs", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="normal reference images: a folder of them, or files (a query among them is left out of "
                        "its own references)")
    p.add_argument("--domain-card", metavar="FILE_OR_JSON",
                   help="what normal means here: a JSON file or object with code, name, normal, anomaly, traits "
                        "(default: a generic card)")
    p.add_argument("--traits", metavar="TRAIT,TRAIT",
                   help="the card's traits, e.g. aligned (fixed pose: pixel comparisons apply), texture, object, "
                        "rotating, counting")
    p.add_argument("--out", default="anomalyclaw-predict",
                   help="folder for the records and tool images (default anomalyclaw-predict; replaced by the "
                        "next predict)")
    run_options(p)
    for action in p._actions:  # these run flags mean nothing for one-off predictions
        if action.dest in ("resume", "retry_errors", "force", "save_images"):
            action.help = argparse.SUPPRESS
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("bench", help="benchmarks: throughput against a fake endpoint, request bytes, tool and "
                                     "expert latency, the demo's wall time; `bench experts`, `bench tools`, `bench memory`")
    p.add_argument("--quick", action="store_true", help="a smaller plan (about two minutes)")
    p.add_argument("--out", metavar="FILE", help="also write the results to this JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(handler=cmd_bench, bench_command=None)
    bsub = p.add_subparsers(dest="bench_command",
                            metavar="experts|tools|tool-calling|fusion|memory|profile|requests|scale|slots|start")
    bench_outputs: list[tuple[argparse.ArgumentParser, str]] = []

    def bench_command(name: str, *, out: str = "the results to this JSON file", **kw: Any) -> argparse.ArgumentParser:
        """A ``bench`` subcommand; each gets --out ("also write OUT") and --json after its own flags."""
        sub_parser = bsub.add_parser(name, **kw)
        bench_outputs.append((sub_parser, out))
        return sub_parser

    b = bench_command("scale", help="only the throughput rows past one process: 1 s latency, concurrency 32, "
                                      "128, 256, with 1 process, --workers 2 and Ray with 2 workers (~8 min)")
    b.add_argument("--concurrency", type=_positive_list, metavar="N[,N...]",
                   help="the concurrencies (default 32,128,256)")
    b.add_argument("--modes", metavar="MODE[,MODE...]",
                   help="process, workers (--workers 2) and/or ray (Ray, 2 workers); default all three")
    b.add_argument("--items", type=POSITIVE_INT, metavar="N",
                   help="items per row (default 4 per slot of concurrency); 1418 is a whole CrossDomainVAD-12 "
                        "test split, whose start and tail weigh what they weigh in a real run")
    b.add_argument("--transport", type=_choices(TRANSPORTS), default="aiohttp",
                   help="comma-separated HTTP transports, a row each (default aiohttp; aiohttp,httpx compares)")
    b.add_argument("--loop", type=_choices(LOOPS), default="auto",
                   help="comma-separated event loops, a row each, side by side (default auto: uvloop where "
                        "installed; asyncio,uvloop compares)")

    b = bench_command("start", help="seconds from launching `run --workers 2` to its first record, last record and "
                                      "exit (fake endpoint, 1 s), its fork server started first as run does, against "
                                      "started by the first worker (~4 min)")
    b.add_argument("--items", type=POSITIVE_INT, default=1418, help="items per run (default 1418)")
    b.add_argument("--rounds", type=POSITIVE_INT, default=2, help="runs of each, alternating (default 2)")
    b.add_argument("--workers", type=_number(int, 2), default=2, help="--workers of the runs (default 2)")
    b.add_argument("--concurrency", type=POSITIVE_INT, default=128, help="--concurrency of the runs (default 128)")

    b = bench_command("experts", out="the full report (with per-item scores) here",
                      help="image and pixel AUROC of the frozen experts per domain")
    b.add_argument("--manifest", required=True, help="manifest file, or a folder holding manifest.json")
    b.add_argument("--split", default="test", help="calibration, dev, test, or all (default: test)")
    b.add_argument("--backbone", default="classic", help="classic (no weights), dinov2 or clip")
    b.add_argument("--backbone-path", help="local folder with the backbone's weights")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    b.add_argument("--domains", help="comma-separated domain codes, e.g. S1,S2")
    b.add_argument("--positional", default="traits",
                   help="anomaly_vfm search: 'traits' (positional, radius 1, on aligned domains only; the "
                        "default), 'off' (free search everywhere) or a radius N in cells for every item")
    b.add_argument("--held-out", choices=["shared", "direct"], default="shared",
                   help="leave-one-out calibration: 'shared' (per image pair, reused across sets; the default) or "
                        "'direct' (a refit per held-out reference, the original method, for comparison)")
    b = bench_command("memory", help="peak resident memory of a long run that reuses a few images, against "
                                       "a run of a tenth as many items")
    b.add_argument("--items", type=POSITIVE_INT, default=5000, help="items in the long run (default 5000)")
    b.add_argument("--baseline-items", type=POSITIVE_INT, help="items in the short run (default a tenth)")
    b.add_argument("--size", type=IMAGE_SIDE, default=128, help="side of the synthetic images in px (default 128)")
    b.add_argument("--concurrency", type=POSITIVE_INT, default=8, help="the runs' --concurrency (default 8)")

    b = bench_command("fusion", help="fused AUROC with and without the expert term per domain, offline, on the "
                                       "synthetic benchmark and an MVTec-style folder drawn from other images")
    b.add_argument("--dir", default="anomalyclaw-bench-fusion", help="folder for the benchmarks and runs")
    b.add_argument("--seed", type=SEED, default=0, help="seed of the synthetic benchmark and the folder")
    b.add_argument("--synth", metavar="MANIFEST", help="use this synthetic benchmark (its test split) instead of "
                                                       "generating one")
    b.add_argument("--weight", type=EXPERT_WEIGHT, help="expert weight of the runs, >= 0 (default 0.2)")
    b.add_argument("--only", choices=["synthetic", "folder"], help="run one of the two benchmarks")

    b = bench_command("profile", help="CPU per item of a run against the fake endpoint, by category (tools, "
                                        "experts, image decode and encode, request building, HTTP, LangGraph, ...)")
    b.add_argument("--client", default="langchain,sdk", help="comma-separated clients to profile (default both)")
    b.add_argument("--transport", type=_choices(TRANSPORTS), default="aiohttp",
                   help="comma-separated HTTP transports, one pass each (default aiohttp; aiohttp,httpx compares)")
    b.add_argument("--items", type=POSITIVE_INT, default=96, help="items in the measured pass (default 96)")
    b.add_argument("--concurrency", type=POSITIVE_INT, default=32, help="VLM requests in flight (default 32)")
    b.add_argument("--latency", type=_number(float, 0.0), default=0.05, help="the fake endpoint's seconds per request")
    b.add_argument("--size", type=IMAGE_SIDE, default=512, help="synthetic image side in px (default 512)")
    b.add_argument("--new-sets", action="store_true",
                   help="items bring new 10-reference sets (else the reference sets are warm)")
    b.add_argument("--compute-slots", type=_positive_list, metavar="N[,N...]",
                   help="threads that may compute at once, one pass each (default: one per core); "
                        "e.g. 2,64 compares the default on 2 cores with no limit")
    b.add_argument("--intra-op-threads", type=_thread_counts, default=[1], metavar="N|libs[,...]",
                   help="BLAS, torch and OpenCV threads inside the run, one pass each (default 1, as a run "
                        "sets them; libs: the libraries' own, e.g. 1,libs compares)")
    b.add_argument("--rounds", type=POSITIVE_INT, default=1,
                   help="repeat the passes, alternating, this many times (A/B on a noisy machine)")

    b = bench_command("slots", help="CPU per item, items/s and context switches per item of runs (no profiler) "
                                      "at each compute-slot setting, alternating (~4 min)")
    b.add_argument("--compute-slots", type=_positive_list, metavar="N[,N...]",
                   help="threads that may compute at once, a pass each per round (default: the cores plus "
                        "one, then one per core, the default; 3,2 on 2 cores)")
    b.add_argument("--rounds", type=POSITIVE_INT, default=3, help="rounds of the passes, alternating (default 3)")
    b.add_argument("--items", type=POSITIVE_INT, default=384, help="items per pass (default 384)")
    b.add_argument("--concurrency", type=POSITIVE_INT, default=32, help="VLM requests in flight (default 32)")
    b.add_argument("--latency", type=_number(float, 0.0), default=0.1, help="the fake endpoint's seconds per request "
                                                                             "(default 0.1)")

    b = bench_command("tools", help="tool latency on synthetic items, or (--manifest) evidence AUROC and "
                                      "localization per tool and domain")
    b.add_argument("--size", type=IMAGE_SIDE, default=512, help="synthetic image side in px (latency)")
    b.add_argument("--repeats", type=POSITIVE_INT, default=30, help="warm calls per tool (latency)")
    b.add_argument("--tools", help="comma-separated tool names (default: all)")
    b.add_argument("--manifest", help="measure evidence quality on this manifest instead of latency")
    b.add_argument("--split", help="manifest split (quality)")
    b.add_argument("--domains", help="comma-separated domain codes (quality)")


    b = bench_command("tool-calling", help="requests and request bytes per item, JSON actions against native "
                                             "tool calling, on the same scripted items (fake endpoint)")
    b.add_argument("--manifest", help="items to use (default: a small synthetic benchmark, two items per domain)")
    b.add_argument("--split", default="test", help="manifest split (default: test)")
    b.add_argument("--limit", type=POSITIVE_INT, default=7, help="items from the manifest (default 7)")
    b.add_argument("--client", choices=["langchain", "sdk"], default="langchain", help="endpoint client")
    b = bench_command("requests", help="event-loop CPU per request of each endpoint client on each HTTP transport "
                                         "(fake endpoint without latency, one image per request)")
    b.add_argument("--client", type=_choices(CLIENTS), default="langchain,sdk",
                   help="comma-separated clients (default langchain,sdk)")
    b.add_argument("--transport", type=_choices(TRANSPORTS), default="aiohttp,httpx",
                   help="comma-separated HTTP transports (default aiohttp,httpx)")
    b.add_argument("--requests", type=POSITIVE_INT, default=600, help="requests measured per pair (default 600)")
    b.add_argument("--concurrency", type=POSITIVE_INT, default=32, help="requests in flight (default 32)")
    b.add_argument("--rounds", type=POSITIVE_INT, default=3,
                   help="repeat the pairs, alternating, this many times (default 3)")
    for b, out in bench_outputs:
        b.add_argument("--out", metavar="FILE", help=f"also write {out}")
        b.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("trace", help="print a finished item's trajectory turn by turn")
    p.add_argument("records", help="run folder or records file")
    p.add_argument("--item", required=True, help="item id")
    p.add_argument("--json", action="store_true", help="print the raw record")
    p.set_defaults(handler=cmd_trace)

    p = sub.add_parser("report", help="write an HTML page of a run: AUROC, plots, each item's trajectory")
    p.add_argument("run", help="run folder (records.jsonl, images/ from --save-images) or records file")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    p.add_argument("--item", action="append", help="only this item (repeatable); no AUROC summary then")
    p.add_argument("--manifest", help="the manifest that was run: adds each item's query and references")
    p.add_argument("--link-images", action="store_true",
                   help="link the images instead of embedding them (smaller page; keep it beside the run)")
    p.add_argument("--alpha", type=FRACTION, default=0.5, help="fusion weight of the direct branch, 0-1 (default 0.5)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("tools", help="list the tool catalog, or run one tool on one item")
    p.add_argument("--json", action="store_true")
    p.add_argument("--drop-tools", help=argparse.SUPPRESS)
    tsub = p.add_subparsers(dest="tools_command", metavar="run")
    r = tsub.add_parser("run", help="run one tool on one manifest item and print its observation")
    r.add_argument("name", help="tool name (see `anomalyclaw tools`)")
    r.add_argument("--manifest", required=True)
    r.add_argument("--item", required=True, help="item id")
    r.add_argument("--args", help='tool arguments as JSON, e.g. \'{"bbox": [0.1, 0.1, 0.4, 0.4]}\'')
    r.add_argument("--out", help="folder for the tool's images")
    r.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_tools, tools_command=None)
    return parser


#: Commands that write a run folder: an interruption tells how to continue.
RUN_COMMANDS = ("run",)


def _log_levels(verbose: int) -> tuple[int, int]:
    """(this project's level, every other library's level) for ``-v`` counted ``verbose`` times."""
    ours = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    theirs = {0: logging.WARNING, 1: logging.WARNING, 2: logging.INFO}.get(verbose, logging.DEBUG)
    return ours, theirs


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _resolve_backend(args: argparse.Namespace) -> None:
    """``--backend`` from what was asked: endpoint flags (``--preset``, ``--base-url``,
    ``--model``) mean the openai backend, and are refused beside ``--backend offline``, which
    would silently ignore them."""
    if not hasattr(args, "backend_default"):
        return
    asked = [flag for flag, value in (("--preset", args.preset), ("--base-url", args.base_url),
                                      ("--model", args.model)) if value]
    if args.backend is None:
        args.backend = "openai" if asked else args.backend_default
    elif args.backend == "offline" and asked:
        raise AnomalyClawError(f"{' and '.join(asked)} {'names' if len(asked) == 1 else 'name'} an endpoint, "
                               "which --backend offline does not use: drop --backend offline (or say --backend "
                               "openai)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = _log_levels(args.verbose)
    logging.basicConfig(level=theirs, format="%(levelname)s %(name)s: %(message)s")
    project_logger = logging.getLogger("anomalyclaw")
    previous_level = project_logger.level
    if args.verbose:
        project_logger.setLevel(ours)
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    handler: Callable[[argparse.Namespace], int] = args.handler
    where = f"anomalyclaw {args.command}"
    resume_hint = (f"; finished items are kept in {Path(args.out)}: rerun with --resume to continue"
                   if args.command in RUN_COMMANDS else "")
    try:
        _resolve_backend(args)
        return handler(args)
    except AnomalyClawError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except (FileNotFoundError, ValueError) as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:  # a file system error no check above foresaw: one line, not a traceback
        target = f" {exc.filename}" if exc.filename else ""
        print(f"{where}: error: cannot read or write{target}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print(f"{where}: interrupted{resume_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{where}: terminated (SIGTERM){resume_hint}", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if args.verbose:
            project_logger.setLevel(previous_level)


if __name__ == "__main__":
    raise SystemExit(main())
