"""The one command-line entry point.  Subcommands only parse arguments and dispatch."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import traceback
from pathlib import Path

from mergescale import console
from mergescale.errors import MergescaleError, SpecError

log = logging.getLogger("mergescale.cli")


def _zoo_build(args: argparse.Namespace) -> int:
    from mergescale.zoo.build import build_zoo, preset_spec
    from mergescale.zoo.report import print_scores

    presets, bases = _list(args.preset), _list(args.base)
    bad = next((s for s in _list(args.seed) if not s.lstrip("-").isdigit()), None)
    if bad is not None:
        raise SpecError(f"--seed: {bad!r} is not an integer")
    seeds = [int(s) for s in _list(args.seed)]
    for preset, base in [(p, b) for p in presets for b in bases]:
        preset_spec(preset, base=base)  # every member's name is checked before the first is built
    members = [(p, b, s) for p in presets for s in seeds for b in bases]
    if args.out is not None and len(members) > 1:
        raise SpecError("--out: a family of several members is built into the cache; drop --out or name one member")
    for preset, base, seed in members:  # every preset's pretrained member before its instruct one (which reuses it)
        zoo = build_zoo(preset_spec(preset, seed=seed, base=base), out=args.out, progress=not args.quiet)
        print_scores(zoo)
        print(zoo.root, file=console.stdout())
    return 0


def _list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _zoo_show(args: argparse.Namespace) -> int:
    from mergescale.zoo.build import Zoo
    from mergescale.zoo.report import print_scores

    print_scores(Zoo.load(args.dir))
    return 0


def _zoo_quality(args: argparse.Namespace) -> int:
    from mergescale.zoo.build import Zoo
    from mergescale.zoo.quality import measure_quality, print_quality

    print_quality(measure_quality(Zoo.load(args.dir)))
    return 0


@contextlib.contextmanager
def _imports_without_gc():
    """Import a command's modules with Python's cyclic garbage collector paused, then freeze what they made.

    ``import torch`` creates about a million long-lived objects, and the collector, triggered every 700
    allocations, walks the growing heap again and again while it does: ~0.15 s of a one-off merge's start-up,
    on its one busy thread (measured: benchmarks/RESULTS.md, "A one-off mergescale merge").
    Module objects live as long as the process, so nothing collectable is lost; ``gc.freeze`` moves them
    out of later collections' way, and the collector runs as usual for the command's own work."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _merge(args: argparse.Namespace) -> int:
    with _imports_without_gc():
        from mergescale.orchestrator.merge import run_merge
        from mergescale.specs import load_merge_spec, load_merge_stages

    options = dict(allow_pickle=args.allow_pickle, progress=not args.quiet, address=args.address, device=args.device,
                   workers=args.workers, include_paths=args.include_path)  # fmt: skip
    stages = load_merge_stages(args.config)
    if stages is not None:  # a multi-stage config: one merge per document, in dependency order
        from mergescale.orchestrator.stages import run_stages

        def said(stage, report) -> None:
            if not args.quiet:
                done = "reused from an earlier run" if report is None else f"merged in {report.seconds:.2f} s"
                print(f"stage {stage.label}: {done}", file=console.stderr())

        run_stages(stages, args.out, on_stage=said, **options)
        print(Path(args.out).absolute(), file=console.stdout())
        return 0
    spec = load_merge_spec(args.config)
    report = run_merge(spec, args.out, **options)
    if not args.quiet:
        if report.fit is not None:
            data = ", ".join(f"{d['count']} {d['task']}/{d['split']}" for d in report.fit.data)
            print(f"{spec.method} fit in {report.fit.seconds:.1f} s on {data}", file=console.stderr())
        where = (f"{report.workers} thread(s) in this process" if report.runner == "local" else
                 f"{report.workers} Ray worker(s), {report.nodes} node(s)")  # fmt: skip
        print(f"merged {report.shards} shards in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s read) on {where}",
              file=console.stderr())  # fmt: skip
    print(report.path, file=console.stdout())
    return 0


def _expert_pairs(values: list[str]) -> dict[str, str]:
    experts = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise SpecError(f"--expert {value}: write TASK=MODEL_DIR (the expert trained for that held-in task)")
        experts[task] = path
    return experts


def _eval(args: argparse.Namespace) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-task bars; ours covers models x tasks
    from mergescale.eval.report import print_results
    from mergescale.orchestrator.evaluate import evaluate_models, write_rows

    base, experts, known = args.base, _expert_pairs(args.expert), {}
    tasks = [t for part in args.tasks for t in part.split(",") if t] if args.tasks else []
    if args.zoo:
        from mergescale.zoo.build import Zoo
        from mergescale.zoo.lm_eval_tasks import PREFIX

        zoo = Zoo.load(args.zoo)
        base = base or zoo.base
        known = {PREFIX + t: str(p) for t, p in zoo.experts.items()}
        tasks = tasks or ["zoo"]
    if not tasks:
        raise SpecError("--tasks: name at least one lm-eval task (e.g. --tasks zoo_held_in,zoo_held_out)")
    report = evaluate_models(
        args.models, tasks, base=base, experts=experts, known_experts=known, include_paths=args.include_path,
        limit=args.limit, backend=args.backend, divergences=not args.no_divergence, address=args.address,
        actors=args.actors, threads=args.threads, device=args.device, max_model_len=args.max_model_len,
        progress=not args.quiet, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    print_results(report.rows, [str(Path(m).resolve()) for m in args.models])
    pool = report.pool
    print(
        f"evaluated {report.models} models x {len({r['task'] for r in report.rows if r['kind'] == 'score'})} tasks "
        f"in {report.seconds:.1f} s on {pool.get('actors')} {args.backend} evaluator(s): "
        f"{pool.get('engines_started')} engine start(s), {pool.get('swaps')} hot swap(s)",
        file=console.stderr(),
    )
    if args.out:
        print(write_rows(report.rows, args.out, "eval"), file=console.stdout())
    return 0


def _study_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from mergescale.orchestrator.report import print_leaderboard
    from mergescale.orchestrator.results import read_results
    from mergescale.orchestrator.study import run_study
    from mergescale.specs import load_study_spec

    spec = load_study_spec(args.spec)
    run = run_study(spec, args.spec, args.out, address=args.address, progress=not args.quiet)
    if spec.kind == "merge":
        print_leaderboard(read_results(run.results), top=args.top)
    else:
        from mergescale.orchestrator.editing_report import print_summary

        print_summary(read_results(run.results), str(run.results))
    print(
        f"study {spec.name}: {run.jobs} jobs, {run.skipped} already done, {run.ran} run now "
        f"({run.references_evaluated} reference models evaluated) in {run.seconds:.1f} s; "
        f"results in {run.results}; report: mergescale study report {run.results} --out DIR",
        file=console.stderr(),
    )
    return 0


def _study_report(args: argparse.Namespace) -> int:
    from mergescale.orchestrator.report import write_report

    for path in write_report(args.results, args.out, metric=args.metric):
        print(path, file=console.stdout())
    return 0


def _search(args: argparse.Namespace) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from mergescale.orchestrator.search import run_search
    from mergescale.specs import load_search_spec

    spec = load_search_spec(args.spec)
    run = run_search(spec, args.spec, args.out, address=args.address, progress=not args.quiet)
    b, t = run.best, run.test
    print(
        f"best: trial {b['trial']} of {run.trials}, objective {b['objective']:.4f} on the validation split "
        f"({t['objective']:.4f} on the test split); held-in normalized {b['held_in']:.4f} validation, "
        f"{t['held_in']:.4f} test",
        file=console.stderr(),
    )
    print(run.best_dir, file=console.stdout())
    overhead = (f" (not merging or scoring: {run.overhead:.0%} of the trial phase, {run.steady_overhead:.0%} between "
                "the first trial's start and the last one's end)" if run.overhead is not None and run.steady_overhead
                is not None else "")  # fmt: skip
    print(
        f"search {spec.name}: {run.trials} trials, {run.ran} finished now, in {run.seconds:.1f} s{overhead}; trials in "
        f"{run.results / 'trials.parquet'}; report: mergescale study report {run.results / 'trials'} --out DIR",
        file=console.stderr(),
    )
    return 0


def _leaderboard_submit(args: argparse.Namespace) -> int:
    from mergescale.leaderboard.queue import Board, submit
    from mergescale.orchestrator.study_models import hub_or_path

    board = Board(args.leaderboard).check()
    if args.name and len(args.models) > 1:
        raise SpecError("--name: names one model; submit several models without it (each is named by its directory)")
    for model in args.models:  # each model is checked (and hashed) before the next is queued
        path = Path(hub_or_path(model, Path.cwd(), "MODEL", "the current directory"))
        request, new = submit(board, model, path, name=args.name, tags=args.tag, base_model=args.base_model,
                              reevaluate=args.reevaluate)  # fmt: skip
        what = "queued" if new else f"already queued ({request['state']}; --reevaluate to evaluate it again)"
        print(f"{request['id']}  {request['name']}: {what}", file=console.stdout())
    return 0


def _leaderboard_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from mergescale.leaderboard.run import run_leaderboard

    run = run_leaderboard(args.leaderboard, address=args.address, progress=not args.quiet,
                          lease_seconds=args.lease_seconds)  # fmt: skip
    recovered = f", {len(run.recovered)} found evaluated by an interrupted run" if run.recovered else ""
    print(f"leaderboard {args.leaderboard}: {run.run}: {len(run.evaluated)} evaluated, {len(run.failed)} failed"
          f"{recovered}, in {run.seconds:.1f} s", file=console.stderr())  # fmt: skip
    return 0


def _leaderboard_publish(args: argparse.Namespace) -> int:
    from mergescale.leaderboard.board import publish

    print(publish(args.leaderboard, args.out), file=console.stdout())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergescale",
        description="Merge many fine-tuned experts with many methods and evaluate them, on Ray.",
    )
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show every library's output and debug logs live, and tracebacks on errors")
    p.add_argument("--log", type=Path, metavar="FILE",
                   help="log file (default: in the run's output directory, or $MERGESCALE_CACHE/logs)")  # fmt: skip
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    zoo = sub.add_parser("zoo", help="build and inspect the synthetic expert zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    b = zsub.add_parser("build", help="build (or reuse from the cache) a zoo of a base and its experts")
    b.add_argument("--preset", default="tiny",
                   help="tiny, small, the scale family's xs, s, m, l (comma-separated), or edit (the editing zoo)")
    b.add_argument("--base", default="pretrained", help="scale family: pretrained, instruct (comma-separated)")
    b.add_argument("--out", type=Path, default=None, help="zoo directory (default: the cache)")
    b.add_argument("--seed", default="0", help="zoo seed (comma-separated for several)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=_zoo_build)
    s = zsub.add_parser("show", help="print the score table of a built zoo")
    s.add_argument("dir", type=Path)
    s.set_defaults(run=_zoo_show)
    q = zsub.add_parser("quality", help="measure the zoo's merge-quality bars (pairwise task arithmetic, averaging)")
    q.add_argument("dir", type=Path)
    q.set_defaults(run=_zoo_quality)

    m = sub.add_parser("merge", help="merge experts into one model (mergescale spec or unmodified mergekit YAML)")
    m.add_argument("config", type=Path, help="merge config: mergescale spec or mergekit YAML")
    m.add_argument("--out", type=Path, required=True, help="output model directory (must not exist or be empty)")
    m.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin checkpoints (they can run code)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "--address",
        help="Ray cluster to join (auto, HOST:PORT or ray://...; default: $RAY_ADDRESS, "
        "else an embedded local Ray using this machine's cores)",
    )
    m.add_argument("--device", default="auto", help="auto (cuda when the cluster has GPUs) | cpu | cuda")
    m.add_argument("--workers", type=int, help="shard tasks in flight at once (default: the cluster's CPUs)")
    m.add_argument("--include-path", action="append", default=[],
                   help="directory of extra lm-eval task YAMLs (experts' tasks, data-driven methods)")  # fmt: skip
    m.set_defaults(run=_merge)

    e = sub.add_parser("eval", help="evaluate model directories on lm-eval tasks with the evaluator pool")
    e.add_argument("models", nargs="+", type=Path, metavar="MODEL_DIR", help="Hugging Face model directories")
    e.add_argument("--tasks", action="append", help="lm-eval tasks, groups or tags, comma-separated (repeatable)")
    e.add_argument("--include-path", action="append", default=[], help="directory of extra lm-eval task YAMLs")
    e.add_argument("--base", type=Path, help="the base model: held-out scores are normalized against it")
    e.add_argument(
        "--expert", action="append", default=[], metavar="TASK=DIR",
        help="the expert of a held-in task: its score normalizes that task's, and divergences are measured to it",
    )  # fmt: skip
    e.add_argument("--zoo", type=Path, help="a zoo directory: its base and experts as references (default tasks: zoo)")
    e.add_argument("--limit", type=int, help="documents per task (default: all)")
    e.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    e.add_argument("--no-divergence", action="store_true", help="skip the JS / KL columns")
    e.add_argument("--out", type=Path, help="write the rows to OUT/eval.parquet")
    e.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    e.add_argument("--actors", type=int, help="evaluator actors (default: one per GPU, or CPUs // threads)")
    e.add_argument("--threads", type=int, help="threads per CPU evaluator (default: 2)")
    e.add_argument("--device", default="auto", help="auto (cuda when the cluster has GPUs) | cpu | cuda")
    e.add_argument("--max-model-len", type=int, help="engine context length (default: the model's, at most 4096)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow models whose config needs custom code (auto_map); it runs that code")  # fmt: skip
    e.set_defaults(run=_eval)

    st = sub.add_parser("study", help="run a study (many expert subsets x many methods, held-in / held-out) and report")
    ssub = st.add_subparsers(dest="study_command", metavar="STUDY_COMMAND", required=True)
    r = ssub.add_parser("run", help="run every job of a study not yet in its results store (resumable)")
    r.add_argument("spec", type=Path, metavar="STUDY.yaml")
    r.add_argument("--out", type=Path, help="results directory (default: the spec's `results:`, else results/NAME)")
    r.add_argument(
        "--address",
        help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray using this machine's cores)",
    )
    r.add_argument("--top", type=int, help="leaderboard rows to print (default: all)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(run=_study_run)
    rp = ssub.add_parser("report", help="leaderboard (Markdown, HTML), plots and tables from a results store")
    rp.add_argument("results", type=Path, nargs="+", metavar="RESULTS",
                    help="results store(s); several are pooled if their reference models agree")  # fmt: skip
    rp.add_argument("--out", type=Path, required=True, help="directory for the report files")
    rp.add_argument("--metric", help="metric to report (default: each task's primary metric)")
    rp.set_defaults(run=_study_report)

    se = sub.add_parser("search", help="search a merge's coefficients with Ray Tune; write the best merge (resumable)")
    se.add_argument("spec", type=Path, metavar="SEARCH.yaml")
    se.add_argument("--out", type=Path, help="results directory (default: the spec's `results:`, else results/NAME)")
    se.add_argument(
        "--address",
        help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray using this machine's cores); "
        "the results directory must be one every node sees",
    )
    se.add_argument("--quiet", action="store_true", help="no progress bar")
    se.set_defaults(run=_search)

    lb = sub.add_parser("leaderboard", help="a queue of models, evaluated on a fixed suite by scheduled runs, "
                        "published as a static site")
    lsub = lb.add_subparsers(dest="leaderboard_command", metavar="LEADERBOARD_COMMAND", required=True)
    ls = lsub.add_parser("submit", help="queue models (model directories or hub ids) for evaluation")
    ls.add_argument("leaderboard", type=Path, metavar="LEADERBOARD", help="the leaderboard directory (its suite: "
                    "LEADERBOARD/leaderboard.yaml)")
    ls.add_argument("models", nargs="+", metavar="MODEL", help="a Hugging Face model directory, or a hub id")
    ls.add_argument("--name", help="the name shown on the board (default: the directory's name, or the hub id)")
    ls.add_argument("--tag", action="append", default=[], help="a tag (repeatable); a merge is tagged from its card")
    ls.add_argument("--base-model", help="its base model (default: what its model card says)")
    ls.add_argument("--reevaluate", action="store_true",
                    help="queue another evaluation of a model already evaluated (its score history)")
    ls.set_defaults(run=_leaderboard_submit)
    lr = lsub.add_parser("run", help="evaluate every waiting request (one tick of the schedule; resumable)")
    lr.add_argument("leaderboard", type=Path, metavar="LEADERBOARD")
    lr.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray); "
                    "the leaderboard directory must be one every node sees")
    lr.add_argument("--lease-seconds", type=float, help="lease on the requests taken (default: the suite's "
                    "lease_seconds); a run that stops renewing loses them to the next run after this long")
    lr.add_argument("--quiet", action="store_true", help="no progress bar")
    lr.set_defaults(run=_leaderboard_run)
    lp = lsub.add_parser("publish", help="write the leaderboard as a static site (works offline)")
    lp.add_argument("leaderboard", type=Path, metavar="LEADERBOARD")
    lp.add_argument("--out", type=Path, required=True, help="the site's directory (replaced atomically)")
    lp.set_defaults(run=_leaderboard_publish)
    return p


def log_file(args: argparse.Namespace) -> Path | None:
    """Where a command's log goes: ``--log``, else the run's output directory (a study's results, an
    evaluation's ``--out``; beside a merge's ``--out``, which must hold the model alone), else the cache.
    Commands that only read and print (a report, a zoo's table) run no engine and keep no log."""
    if args.log:
        return args.log
    command = args.command
    groups = ("study", "zoo", "leaderboard")
    subcommand = next((getattr(args, f"{c}_command") for c in groups if hasattr(args, f"{c}_command")), None)
    if (command, subcommand) in {
        ("study", "report"),
        ("zoo", "show"),
        ("leaderboard", "submit"),
        ("leaderboard", "publish"),
    }:
        return None
    if command == "merge":
        out = Path(args.out).absolute()
        return out.with_name(out.name + ".log")
    if command == "eval" and args.out:
        return Path(args.out) / "eval.log"
    if command == "study" and args.study_command == "run":
        from mergescale.orchestrator.study import results_dir
        from mergescale.specs import load_study_spec

        with_stamp = console.default_log("study").name
        return results_dir(load_study_spec(args.spec), args.spec, args.out) / "logs" / with_stamp
    if command == "leaderboard":  # a run: its log beside the queue it works on
        return Path(args.leaderboard) / "logs" / console.default_log("leaderboard").name
    if command == "search":
        from mergescale.orchestrator.study import results_dir
        from mergescale.specs import load_search_spec

        with_stamp = console.default_log("search").name
        return results_dir(load_search_spec(args.spec), args.spec, args.out) / "logs" / with_stamp
    return console.default_log(command)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        path = log_file(args)
    except MergescaleError as err:  # e.g. a study spec that does not parse: nothing has run yet
        print(f"mergescale: error: {err}", file=sys.stderr)
        return 2
    with console.session(path, verbose=args.verbose):
        log.info("mergescale %s", " ".join(sys.argv if argv is None else ["mergescale", *argv]))
        try:
            code = args.run(args)
            console.announce_log()
            return code
        except MergescaleError as err:
            log.debug("user error", exc_info=True)  # the traceback: in the log file (and live with --verbose)
            print(f"mergescale: error: {err}", file=console.stderr())
            return 2
        except KeyboardInterrupt:
            log.debug("interrupted", exc_info=True)
            print("mergescale: interrupted", file=console.stderr())
            return 130
        except Exception as err:
            log.debug("bug", exc_info=True)  # the traceback: in the log file (and live with --verbose)
            first = f"{err}".splitlines()[0] if f"{err}" else ""
            if path is None:  # a command without a log file (a report, zoo show): the traceback goes here
                traceback.print_exc(file=console.stderr())
            where = f"the traceback is in {path}" if path is not None else "the traceback is above"
            print(f"mergescale: bug: {type(err).__name__}: {first} — this is a bug in mergescale, not in your "
                  f"input; {where}", file=console.stderr())  # fmt: skip
            return 1


def run() -> None:
    """The console script: :func:`main`, then a fast exit.  After ``import torch`` the interpreter's own
    teardown takes about a second (measured 1.1 s on 2 cores) and does nothing a finished command needs:
    every file is written and renamed, the log is closed.  Where this process joined Ray, the normal
    exit runs instead, so that ``ray.shutdown`` (at exit) stops what ``ray.init`` started."""
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
