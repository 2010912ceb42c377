"""The ``tuneline`` command.

    tuneline services up          # SeaweedFS (S3), MLflow server, Prefect server; prints URLs
    tuneline services up --backend postgres   # PostgreSQL behind MLflow and Prefect
    tuneline services up --insecure           # every service open, no credentials (throwaway use only)
    tuneline services status
    tuneline services down
    tuneline run --params deployments/params/default.yaml [--set train.max_steps=10 ...]
    tuneline sweep --params deployments/params/tiny.yaml --space deployments/sweeps/lora-tiny.yaml --trials 6
                   [--parallel 2] [--set k=v] [--study NAME]   # Optuna trials, pruned early; the best registered
    tuneline scrub --input in.jsonl --output out.jsonl --field text   # PII scrubber alone, streaming
                   [--action placeholder|hash|mask]   # hash: salt from TUNELINE_PII_SALT
    tuneline models [NAME]                 # registered versions, aliases, gate metric and decision
    tuneline models NAME --history         # every alias move: time, actor, action, reason
    tuneline promote NAME VERSION [--force --reason TEXT]
    tuneline rollback NAME                 # champion back to previous-champion
    tuneline predict NAME[@alias|/version] TEXT [TEXT ...]
    tuneline export NAME[@alias|/version] --format safetensors|gguf --output PATH [--dtype f32|f16]
    tuneline serve NAME[@alias|/version] [--port 5001]   # files verified, then `mlflow models serve`
    tuneline data worst RUN [--top 50]     # highest-loss and duplicated-looking records (RUN: MLflow run
                                           # id, NAME/VERSION or NAME@ALIAS)
    tuneline run --resume [RUN_ID]  # a failed/crashed run again, same parameters: done tasks
                                    # are cached, training continues from its newest checkpoint;
                                    # without RUN_ID: this checkout's one run of the --params model
    tuneline deploy [--pool process|docker|kubernetes] [--only NAME] [--schedules keep|on|off]
                                    # register deployments/prefect.yaml with the Prefect server
    tuneline worker [--pool-name tuneline-process] [--limit 1]   # a local process worker

`run` uses the local services' endpoints and credentials unless the environment already
names others (TUNELINE_S3_ENDPOINT_URL, MLFLOW_TRACKING_URI, PREFECT_API_URL, AWS_*).
Quiet by default (the steps' own lines, a progress bar on a terminal, the summary); ``tuneline -v ...``
shows every library's lines. Exit codes: 0 done, 2 bad data or configuration, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO / "deployments" / "params" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneline", description="Fine-tuning as a production pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every library's log lines and warnings (default: the steps' own lines and the summary)")
    sub = parser.add_subparsers(dest="command", required=True)

    services = sub.add_parser("services", help="start, stop or inspect the local S3, MLflow and Prefect servers")
    services.add_argument("action", choices=["up", "down", "status"])
    services.add_argument("--no-prefect", action="store_true", help="do not start the Prefect server")
    services.add_argument("--backend", choices=["sqlite", "postgres"],
                          help="database of MLflow and Prefect (default: $TUNELINE_DB_BACKEND or sqlite); postgres "
                          "runs a local PostgreSQL cluster (apt-get install postgresql), the production backend")
    services.add_argument("--insecure", action="store_true", default=None,
                          help="start every service open to anyone on this machine, without credentials (also "
                          "TUNELINE_INSECURE=1); by default all need the generated credentials of the state dir")

    run = sub.add_parser("run", help="run the fine-tuning flow end to end")
    run.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="YAML parameter file (deployments/params/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, e.g. train.max_steps=10 (YAML value)")
    run.add_argument("--resume", nargs="?", const="latest", metavar="RUN_ID",
                     help="resume a failed, crashed or cancelled flow run with its own parameters; without RUN_ID "
                     "the one such run of this checkout and of the --params file's model (several: they are "
                     "listed, name one); needs the Prefect server that recorded it")

    sweep = sub.add_parser("sweep", help="hyperparameter search: Optuna trials as flow runs sharing the cached data "
                           "steps, bad ones pruned early, the best one registered through the promotion gate")
    sweep.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="YAML parameter file (deployments/params/)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter, e.g. train.max_steps=20 (YAML value)")
    sweep.add_argument("--space", type=Path, required=True,
                       help="YAML search space: PipelineParams paths and their distributions (deployments/sweeps/)")
    sweep.add_argument("--trials", type=int, required=True,
                       help="trials of the study in total (complete or pruned; a rerun continues up to this many)")
    sweep.add_argument("--parallel", type=int, default=1, help="trials at once (default 1)")
    sweep.add_argument("--trial-deployment", metavar="FLOW/DEPLOYMENT",
                       help="run each trial as a flow run of this deployment (e.g. tuneline-trial/trial, on its "
                       "work pool) instead of in this process")
    sweep.add_argument("--study", help="the study's name (default: the model name and a digest of the parameters "
                       "and the space; sweepers with the same name share the study)")

    scrub = sub.add_parser("scrub", help="normalize and remove PII from fields of a JSONL file (streams; keeps "
                           "every other field and the record order)")
    scrub.add_argument("--input", type=Path, required=True, help="JSONL file to read")
    scrub.add_argument("--output", type=Path, required=True, help="JSONL file to write (replaced only on success)")
    scrub.add_argument("--field", dest="fields", action="append", required=True, metavar="NAME",
                       help="field to scrub: a string, or a list of chat messages (repeat for several fields)")
    scrub.add_argument("--entities", default=None, help="comma-separated PII types (default: all)")
    scrub.add_argument("--action", choices=["placeholder", "hash", "mask"], default="placeholder",
                       help="placeholder: <EMAIL>; hash: <EMAIL:1a2b3c4d5e6f>, HMAC-SHA256 keyed with the secret salt "
                       "in TUNELINE_PII_SALT (required, at least 16 characters; equal values get equal tokens); mask: "
                       "letters and digits become * (phones and cards keep their last 4 digits)")

    models = sub.add_parser("models", help="registered versions with aliases, gate metric and decision")
    models.add_argument("name", nargs="?", help="one registered model (default: all)")
    models.add_argument("--history", action="store_true",
                        help="every alias move of NAME (register, gate, promote, force, rollback) with time, actor "
                        "and reason")
    promote = sub.add_parser("promote", help="make a version champion if it passes the gate against the champion")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="skip the gate (needs --reason; recorded)")
    promote.add_argument("--reason", help="why the gate is overridden")
    rollback = sub.add_parser("rollback", help="champion back to previous-champion")
    rollback.add_argument("name")
    predict = sub.add_parser("predict", help="answer prompts or classify texts with a registered model")
    predict.add_argument("model", help="NAME (its champion), NAME@alias or NAME/version")
    predict.add_argument("inputs", nargs="+", help="prompts or texts")
    predict.add_argument("--max-new-tokens", type=int, default=64)

    export = sub.add_parser("export", help="a registered version as merged safetensors (vLLM, TGI) or GGUF "
                            "(llama.cpp), checked by loading it back")
    export.add_argument("model", help="NAME (its champion), NAME@alias or NAME/version")
    export.add_argument("--format", dest="fmt", choices=["safetensors", "gguf"], required=True)
    export.add_argument("--output", type=Path, required=True, help="folder (safetensors) or .gguf file to write")
    export.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="weight precision (default f32)")
    serve = sub.add_parser("serve", help="check a registered version's files against the digests recorded at "
                           "registration, then serve it with `mlflow models serve` (POST /invocations)")
    serve.add_argument("model", help="NAME (its champion), NAME@alias or NAME/version")
    serve.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--workers", type=int, default=1, help="server processes (default 1)")

    data = sub.add_parser("data", help="data curation from a run's per-record losses")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    worst = data_sub.add_parser("worst", help="the highest-loss and duplicated-looking records of a run, by id")
    worst.add_argument("run", help="MLflow run id, or a model version: NAME/VERSION or NAME@ALIAS")
    worst.add_argument("--top", type=int, default=50, help="records to list (default 50)")

    deploy = sub.add_parser("deploy", help="register the deployments of deployments/prefect.yaml with the Prefect "
                            "server (parameters from deployments/params/, work pool created if missing)")
    deploy.add_argument("--pool", choices=["process", "docker", "kubernetes"], default="process",
                        help="work pool kind from prefect.yaml (default: process, the local one)")
    deploy.add_argument("--pool-name", help="work pool name (default: the pool's name in prefect.yaml)")
    deploy.add_argument("--only", action="append", metavar="NAME", help="deploy only this one (repeatable)")
    deploy.add_argument("--schedules", choices=["keep", "on", "off"], default="keep",
                        help="keep: new schedules inactive, existing ones as they are on the server (default); "
                        "on/off: switch them all")
    deploy.add_argument("--image-cpu", help="CPU image for docker/kubernetes (default: the one in prefect.yaml)")
    deploy.add_argument("--publish-service-env", action="store_true",
                        help="save the services' endpoints (Prefect Variables) and credentials (Secret blocks) that "
                        "the docker pool's containers get by reference (deployments/work-pools/docker.json)")
    deploy.add_argument("--image-gpu", help="GPU image for kubernetes training runs (default: the one in prefect.yaml)")
    worker = sub.add_parser("worker", help="start a process worker that runs the deployments' flow runs here")
    worker.add_argument("--pool-name", default="tuneline-process", help="work pool to poll (default: tuneline-process)")
    worker.add_argument("--limit", type=int, default=1,
                        help="flow runs at once (default 1: one training at a time; 0 = no limit)")

    args = parser.parse_args(argv)
    from flows import console

    console.setup(args.verbose)
    if args.command == "services":
        return services_command(args.action, prefect=not args.no_prefect, backend=args.backend,
                                insecure=args.insecure)
    if args.command in ("models", "promote", "rollback", "predict", "data", "export", "serve"):
        return registry_command(args)
    if args.command == "scrub":
        return scrub_command(args.input, args.output, args.fields, args.entities, args.action)
    if args.command in ("deploy", "worker"):
        return deploy_command(args)
    if args.command == "sweep":
        if args.trials < 1 or args.parallel < 1:
            parser.error("--trials and --parallel must be at least 1")
        return sweep_command(args)
    if args.resume is not None:
        if args.overrides or (args.resume != "latest" and args.params != DEFAULT_PARAMS):
            parser.error("--resume takes the run's own parameters; it cannot be combined with --set, nor --params "
                         "with a run id (a bare --resume reads only the model name from --params)")
        return run_command(args.params, [], resume=args.resume)
    return run_command(args.params, args.overrides)


def services_command(action: str, prefect: bool, backend: str | None = None, insecure: bool | None = None) -> int:
    from services import stack as services

    cfg = services.ServiceConfig.from_env().with_options(backend, insecure)
    if action == "up":
        services.up(cfg, prefect=prefect)
    elif action == "down":
        services.down(cfg)
        print("services stopped")
        return 0
    for name, info in services.status(cfg).items():
        print(f"{name:<8} {'running' if info['running'] else 'stopped':<8} {info['url']}")
    if not cfg.insecure:  # where the UI passwords are; never the passwords themselves
        creds = cfg.state_dir / "credentials.json"
        print(f"UI logins (passwords in {creds}, mode 600):\n"
              f"  MLflow   user {services.ADMIN_USER}, password: jq -r .mlflow_password {creds}\n"
              f"  Prefect  {services.PREFECT_USER}:PASSWORD, PASSWORD: jq -r .prefect_password {creds}")
    return 0


def registry_command(args: argparse.Namespace) -> int:
    from steps.core.errors import ArtifactError, ConfigError
    from steps.register import registry

    use_local_services()
    try:
        if args.command == "models" and args.history:
            if not args.name:
                raise ConfigError("--history needs a registered model NAME")
            print("\n".join(registry.history_lines(registry.history(args.name))))
        elif args.command == "models":
            rows = registry.list_versions(args.name)
            print(f"{'model':<24} {'ver':>4}  {'aliases':<28} {'method':<7} {'metric':<14} {'value':<10} decision")
            for r in rows:
                print(f"{r['name']:<24} {r['version']:>4}  {','.join(r['aliases']) or '-':<28} {r['method']:<7} "
                      f"{r['metric']:<14} {r['value']:<10} {r['decision']}")
            if not rows:
                print("no registered models")
        elif args.command == "promote":
            print(registry.promote(args.name, args.version, args.force, args.reason))
        elif args.command == "rollback":
            print(registry.rollback(args.name))
        elif args.command == "data":
            print_worst(*registry.record_losses(args.run), args.top)
        elif args.command == "serve":
            return serve_command(args.model, args.host, args.port, args.workers)
        elif args.command == "export":
            from steps.register.export import export_version

            report = export_version(args.model, args.fmt, args.output, args.dtype)
            print(f"exported {args.model} to {args.output} ({args.fmt}, {args.dtype}); loaded back: largest logit "
                  f"difference {report['max_logit_diff']:.3g}, greedy answers "
                  f"{'agree' if report['answers_agree'] else 'DIFFER'} on {len(report['prompts'])} prompts "
                  f"(report: {args.output}.export.json)")
        else:
            for text, answer in zip(args.inputs, registry.predict(args.model, args.inputs, args.max_new_tokens)):
                print(f"{text}\t{answer}")
    except (ConfigError, ArtifactError) as exc:  # ArtifactError: a registered file differs from its digest
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def serve_command(spec: str, host: str, port: int, workers: int) -> int:
    """`tuneline serve`: the version's files downloaded and checked against its recorded digests (ArtifactError
    naming the file otherwise), then `mlflow models serve -m <that folder> --env-manager local` until it stops.
    The scoring server starts `uvicorn` from PATH: this environment's bin folder is put first."""
    import contextlib
    import signal
    import subprocess
    import tempfile

    from steps.register.verify import verified_model_dir

    with tempfile.TemporaryDirectory(prefix="tuneline-serve-") as tmp:
        folder = verified_model_dir(spec, Path(tmp))
        print(f"{spec}: every file matches the digests recorded at registration; serving on http://{host}:{port}",
              flush=True)
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        command = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(folder), "--env-manager", "local",
                   "-h", host, "-p", str(port), "-w", str(workers)]
        server = subprocess.Popen(command, env=env, start_new_session=True)  # its own group: stopped as one

        def stop(*_: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        try:
            return server.wait()
        except KeyboardInterrupt:
            stop()
            return server.wait()


def print_worst(run_id: str, losses: list[dict[str, Any]], top: int) -> None:
    """``tuneline data worst``: the highest-loss records, then groups of duplicated-looking ones."""
    from steps.register.registry import worst_lines, worst_records

    print("\n".join(worst_lines(run_id, worst_records(losses, top))))


def deploy_command(args: argparse.Namespace) -> int:
    """`tuneline deploy` and `tuneline worker`, against the local services unless the environment names others."""
    from steps.core.errors import ConfigError

    links = use_local_services()
    from flows import deploy

    try:
        deploy.require_api()
        if args.command == "worker":
            print(f"worker for pool {args.pool_name} (Ctrl-C stops it)", flush=True)
            return deploy.run_worker(args.pool_name, args.limit or None)
        if args.publish_service_env:
            saved = deploy.publish_service_env(dict(os.environ))
            print(f"saved on the Prefect server, for the Docker pool's containers: {', '.join(saved)}")
        done = deploy.deploy(args.pool, args.only, args.schedules, args.image_cpu, args.image_gpu, args.pool_name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - server unreachable, refused deployment: one readable line
        print(f"error: deploy failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ui = links.get("prefect_ui")
    for d in done:
        print(f"{d.full_name:<32} pool {d.pool:<22} {'; '.join(d.schedules) or 'no schedule'}")
        if ui:
            print(f"  {ui}/deployments/deployment/{d.id}")
    pool = done[0].pool if done else args.pool
    hint = f"tuneline worker --pool-name {pool}" if args.pool == "process" else f"prefect worker start --pool {pool}"
    print(f"{len(done)} deployment(s) registered; their runs start once a worker polls the pool: {hint}")
    return 0


def scrub_command(source: Path, target: Path, fields: list[str], entities: str | None,
                  action: str = "placeholder") -> int:
    from steps.core.errors import ConfigError, DataQualityError
    from steps.scrub.file import scrub_file
    from steps.text.pii import ENTITIES, PiiEngine

    chosen = [e.strip() for e in entities.split(",")] if entities else list(ENTITIES)
    unknown = sorted(set(chosen) - set(ENTITIES))
    if unknown:
        print(f"error: unknown PII types {unknown}; known: {', '.join(ENTITIES)}", file=sys.stderr)
        return 2
    if source.resolve() == target.resolve():
        print("error: --output must differ from --input", file=sys.stderr)
        return 2
    try:
        stats = scrub_file(source, target, fields, PiiEngine(chosen, default_action=action))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataQualityError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    found = ", ".join(f"{k}={v}" for k, v in stats["pii"].items())
    done = {"placeholder": "replaced", "hash": "hashed", "mask": "masked"}[action]
    salt = f"; salt id {stats['salt_id']}" if stats.get("salt_id") else ""
    print(f"scrubbed {stats['lines']} lines into {target} (PII {done}: {found}{salt})")
    return 0


def run_command(params_path: Path, overrides: list[str], resume: str | None = None) -> int:
    from steps.config import PipelineParams
    from steps.core.errors import ConfigError

    options: dict = {}
    try:
        if resume is None:
            params = PipelineParams.from_yaml(params_path, overrides)
            links = use_local_services()
            reap_dead_runs()
        else:
            from flows.resume import find_run, resume_plan

            model = PipelineParams.from_yaml(params_path).register_.model_name if resume == "latest" else None
            links = use_local_services()
            reap_dead_runs()
            run = find_run(None if resume == "latest" else resume, model)
            params, options = resume_plan(run)
            print(f"resuming flow run {run.id} ({run.name}) with its own parameters")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.pipeline import finetune
    from steps.register.report import render_summary

    outcome = finished(lambda: start(finetune, params, options), "run")
    if isinstance(outcome, int):
        return outcome
    state, summary = outcome
    if links.pop("mlflow", None) is not None:  # the run and the version, in the UI's model-training view
        from steps.register.step import version_links

        links |= {"mlflow run": (pages := version_links(summary.version)).get("MLflow run", ""),
                  "version": pages.get("model version", "")}
    if "prefect_ui" in links:
        links["flow run"] = f"{links.pop('prefect_ui')}/runs/flow-run/{state.state_details.flow_run_id}"
    print("\n" + render_summary(summary, links))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """`tuneline sweep`: the parameters and the space checked before anything runs, then the sweep flow here."""
    from steps.config import PipelineParams
    from steps.core.errors import ConfigError
    from steps.sweep.space import SweepSpace

    try:
        params = PipelineParams.from_yaml(args.params, args.overrides)
        space = SweepSpace.from_yaml(args.space)
        space.check(params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    links = use_local_services()
    reap_dead_runs()
    from prefect import tags

    from flows.resume import origin_tags
    from flows.sweep import sweep

    def run_sweep() -> Any:
        with tags(*origin_tags()):
            return sweep(params, space, args.trials, args.parallel, args.trial_deployment, args.study,
                         return_state=True)

    outcome = finished(run_sweep, "sweep")
    if isinstance(outcome, int):
        return outcome
    state, result = outcome
    print("\n" + render_sweep(result, links, state.state_details.flow_run_id))
    return 0


def finished(call: Any, what: str) -> tuple[Any, Any] | int:
    """(the flow's final state, its result), or the exit code after one readable line on stderr: 2 for bad data
    or settings, 1 for any other failure of the ``what`` (run, sweep)."""
    from steps.core.errors import ConfigError, DataQualityError

    try:
        state = call()
        return state, state.result()
    except (DataQualityError, ConfigError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the exit code and one readable line are the contract
        print(f"\nerror: the {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def render_sweep(result: Any, links: dict[str, str], flow_run_id: Any) -> str:
    """The trials table, the counts, best against the parameter file's own values, and where the best went."""
    n = result.numbers
    keys = [k for k in result.table[0] if k not in ("trial", "state", "value", "pruned_at", "baseline", "seconds")] \
        if result.table else []
    lines = [f"sweep {result.study}: {n['trials']} trials, {n['complete']} complete, {n['pruned']} pruned, "
             f"{n['failed']} failed", f"{'trial':>5}  {'state':<9} {'eval loss':>10} {'pruned at':>9}  "
             + "  ".join(f"{k:>22}" for k in keys)]
    for row in result.table:
        value = f"{row['value']:.4f}" if row["value"] is not None else "-"
        cells = "  ".join(f"{row.get(k)!s:>22}" for k in keys)
        mark = " (parameter file)" if row["baseline"] else ""
        lines.append(f"{row['trial']:>5}  {row['state']:<9} {value:>10} {row['pruned_at'] or '-':>9}  {cells}{mark}")
    if n["best_value"] is not None:
        against = f" vs {n['baseline_value']:.4f} with the parameter file's values" \
            if n["baseline_value"] is not None else ""
        lines.append(f"best: trial {n['best_trial']}, eval loss {n['best_value']:.4f}{against}: {n['best_params']}")
    if result.best is not None:
        d = result.best.decision
        alias = "champion" if d.champion_version == result.best.version.version else "challenger"
        lines.append(f"best trial registered: {result.best.version.name} v{result.best.version.version}, {alias} "
                     f"({d.reason})")
    if "mlflow" in links:
        lines.append(f"MLflow parent run: {result.parent_run}")
    if "prefect_ui" in links:
        lines.append(f"flow run: {links['prefect_ui']}/runs/flow-run/{flow_run_id}")
    return "\n".join(line for line in lines if line)


def start(flow: Any, params: Any, options: dict) -> Any:
    """Run the flow in this process, tagged with where it runs (host, checkout, pid: flows/resume.py); a
    resuming run gets its own name and a tag naming the run it resumes."""
    from prefect import tags

    from flows.resume import origin_tags

    with tags(*options.get("tags", []), *origin_tags()):
        if not options:
            return flow(params, return_state=True)
        return flow.with_options(flow_run_name=options["flow_run_name"])(params, return_state=True)


def reap_dead_runs() -> None:
    """Mark Crashed this host's RUNNING runs whose process died (flows/resume.py); never stops a run from starting."""
    from flows.resume import reap_dead_runs as reap

    try:
        dead = reap()
    except Exception as exc:  # noqa: BLE001 - the check is a courtesy: an unreachable API fails the run itself later
        print(f"warning: could not check for flow runs whose process died: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return
    for run in dead:
        print(f"flow run {run.id} ({run.name}) was {run.state.type.value} but its process is gone: marked Crashed "
              f"(resume it: tuneline run --resume {run.id})", file=sys.stderr)


def use_local_services() -> dict[str, str]:
    """Point clients at the local services (unless the environment names others); return UI links."""
    from services import stack as services

    cfg = services.ServiceConfig.from_env()
    state = services.status(cfg)
    if state.get("s3", {}).get("running"):
        for key, value in services.client_env(cfg).items():
            os.environ.setdefault(key, value)
    links = {}
    if state.get("mlflow", {}).get("running") or "MLFLOW_TRACKING_URI" in os.environ:
        links["mlflow"] = os.environ.get("MLFLOW_TRACKING_URI", "")
    if state.get("prefect", {}).get("running"):
        links["prefect_ui"] = services.urls(cfg)["prefect_ui"]
    return links


if __name__ == "__main__":
    sys.exit(main())
