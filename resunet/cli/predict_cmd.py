"""``resunet predict INPUT... --out DIR``: segment one study or thousands (see resunet.inference.batch)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from resunet.errors import ConfigError, InputError, PacsError
from resunet.io.limits import add_limit_argument, limits_from_args


def add_tls_arguments(group: argparse._ArgumentGroup) -> None:
    """--tls-ca/--tls-cert/--tls-key, the DIMSE-over-TLS files of predict and serve (one home)."""
    group.add_argument("--tls-ca", default=None, metavar="FILE",
                       help="dimses://: CA file (PEM) that signed the archive's certificate; it is verified with the "
                       "hostname check on, no plaintext fallback (default: the system's CAs). serve --dicom-tls: "
                       "senders must present a certificate it signed")
    group.add_argument("--tls-cert", default=None, metavar="FILE",
                       help="dimses://: our certificate (PEM), for archives that check clients; serve --dicom-tls: "
                       "the node's certificate")
    group.add_argument("--tls-key", default=None, metavar="FILE",
                       help="dimses://: our private key (PEM, unencrypted; keep it mode 0600: a key others can read "
                       "is used with a warning)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment scans (NIfTI, DICOM folders/zips, folders or lists of them)",
        description="Segment each case and write a mask on exactly its grid, plus predictions.json/.csv. "
        "Re-running the same command skips finished cases (same input and model hash). "
        "Exit code 0: all ok; 1: some cases failed; 2: every case failed or bad arguments.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="NIfTI file, DICOM folder, .zip, a folder of such cases, or a .txt/.csv list of them "
                   "(none with --pacs)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--model", default=None, nargs="+", action="extend", metavar="MODEL",
                   help="checkpoint (.pt), export (.onnx, TorchScript) or bundled model name (brain_extraction, "
                   "brain_tissue; see resunet info --list); default: the bundled brain_extraction. Several models "
                   "(or a run folder of `resunet train --fold all`) "
                   "predict as one ensemble: softmax probabilities averaged window by window. Values after the first "
                   "that are not models (no .pt/.onnx/.ts suffix, bundled name or run folder) count as INPUTs")
    p.add_argument("--routes", type=Path, default=None, metavar="FILE",
                   help="routing rules (YAML, the file of resunet serve --routes; docs/pacs.md): each DICOM input is "
                   "segmented by the model (or chain) of the first rule its series matches, into OUT/<rule name>/; "
                   "inputs no rule matches are left alone (listed by case id). With --pacs, each series of the pulled "
                   "study is routed the same way and its SEG stored back. Not with --model/--then or --ray")
    p.add_argument("--then", default=[], action="append", metavar="MODEL",
                   help="a model chain: after --model, segment again with MODEL, only inside the previous "
                   "model's foreground (the scan is set to 0 outside it), and keep MODEL's labels there; e.g. "
                   "--model brain_extraction --then brain_tissue (tissue classes of the extracted brain). Repeatable")
    p.add_argument("--format", default="nifti,seg", metavar="LIST",
                   help="outputs: nifti (mask .nii.gz), seg (DICOM SEG for DICOM inputs), rtstruct (RT Structure "
                   "Set contours for DICOM inputs), sr (DICOM SR TID 1500 measurement report of the SEG: volume per "
                   "label; needs seg); default nifti,seg")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--tta", dest="tta", action=argparse.BooleanOptionalAction, default=True,
                   help="mirror test-time augmentation (all flips; default on)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap fraction in [0, 1); default 0.5")
    p.add_argument("--sw-batch", type=int, default=2, metavar="N", help="windows per network call (default 2)")
    p.add_argument("--amp", dest="amp", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 autocast on CUDA (default on for CUDA)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.prob.nii.gz")
    p.add_argument("--uncertainty", nargs="?", const="tta", choices=["tta", "mc"], default=None,
                   help="write <case>.uncertainty.nii.gz: entropy across TTA flips (tta, default) or MC dropout "
                   "(and ensemble members); ensembles also write <case>.uncertainty-models.nii.gz (members' disagreement)")
    p.add_argument("--no-postprocess", action="store_true", help="skip the checkpoint's post-processing")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="background threads reading upcoming cases")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run shard I of N (0-based); torchrun's RANK/WORLD_SIZE are used when set")
    p.add_argument("--series", default=None, metavar="UID", help="DICOM series to read (default: largest)")
    p.add_argument("--no-resume", action="store_true", help="recompute cases even if already done")
    p.add_argument("--audit-db", default=None, metavar="FILE",
                   help="audit log (default $RESUNET_AUDIT_DB or ~/.resunet/audit.sqlite)")
    p.add_argument("--no-audit", action="store_true", help="do not append the run to the audit log")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cluster = p.add_argument_group("cluster (Ray), see docs/inference.md 'Running on a cluster'")
    cluster.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                         help="run the cases as Ray tasks on a cluster: auto ($RAY_ADDRESS or the cluster this machine "
                         "joined with `ray start`; the default of a bare --ray), HEAD:6379, ray://HEAD:10001, or local "
                         "(a private instance on this machine); inputs, model and --out on a filesystem every node "
                         "mounts. Needs pip install 'resunet[ray]'")
    cluster.add_argument("--ray-actors", type=int, default=None, metavar="N",
                         help="cases in flight = warm model copies (default: as many as the cluster's CPUs/GPUs hold)")
    cluster.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="C",
                         help="CPUs per worker, also its torch threads (default 1)")
    cluster.add_argument("--ray-gpus-per-actor", type=float, default=0.0, metavar="G",
                         help="GPUs per worker (default 0: CPU inference; 0.5: two workers share a GPU)")
    cluster.add_argument("--ray-retries", type=int, default=3, metavar="N",
                         help="times a case whose worker or node died is run again elsewhere before it is recorded "
                         "failed (default 3)")
    pacs = p.add_argument_group("PACS (DICOMweb or DIMSE), see docs/pacs.md")
    pacs.add_argument("--pacs", default=None, metavar="URL",
                      help="the archive: a DICOMweb root (http://pacs:8042/dicom-web) or a DIMSE node "
                      "(dimse://AET@HOST:PORT, dimses:// for TLS); the study is pulled, segmented, and its SEG "
                      "(RTSTRUCT, SR with --format) stored back into it")
    pacs.add_argument("--study", default=None, metavar="UID", help="Study Instance UID to pull (with --pacs)")
    pacs.add_argument("--accession", default=None, metavar="N", help="DIMSE: find the study by accession number")
    pacs.add_argument("--patient-id", default=None, metavar="ID", help="DIMSE: find the study by patient ID "
                      "(with --date-range when the patient has several)")
    pacs.add_argument("--date-range", default=None, metavar="YYYYMMDD-YYYYMMDD", help="DIMSE: study date range")
    pacs.add_argument("--retrieve", choices=("get", "move"), default="get",
                      help="DIMSE: fetch with C-GET (default) or C-MOVE to our AE on --move-port")
    pacs.add_argument("--move-port", type=int, default=0, metavar="PORT",
                      help="DIMSE C-MOVE: the port our node listens on during the retrieve, as the archive knows it")
    pacs.add_argument("--calling-aet", default="RESUNET", metavar="AET",
                      help="DIMSE: our AE title (the archive must know it; the C-MOVE destination; default RESUNET)")
    add_tls_arguments(pacs)
    pacs.add_argument("--pacs-user", default=None, metavar="USER",
                      help="DICOMweb: HTTP basic user (password from $RESUNET_PACS_PASSWORD); a bearer token comes from "
                      "$RESUNET_PACS_TOKEN")
    pacs.add_argument("--no-store", action="store_true", help="with --pacs: keep the results local, store nothing")
    add_limit_argument(p)
    p.set_defaults(func=run)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def run(args: argparse.Namespace) -> int:
    from resunet.inference.batch import BatchOptions, run_batch, shard_from_env
    from resunet.inference.cases import discover_cases
    from resunet.inference.predictor import Predictor

    import logging

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied DICOM module
    from resunet.inference.ensemble import expand_model_args, split_model_args

    if args.model:
        args.model, args.inputs = split_model_args(args.model, args.inputs)
    from resunet.inference.bundled import default_model_path

    routes = None
    if args.routes is not None:  # a bad rules file (or a rule's missing model) stops here, before anything runs
        from resunet.pacs.routing import load_routes

        if args.model or args.then:
            raise ConfigError("--routes picks the model of each series: leave out --model/--then (or --routes)")
        if args.ray is not None:  # each rule loads its own model here; a Ray worker holds one warm model
            raise ConfigError("--routes with --ray is not supported: the Ray workers keep one warm model each, and "
                              "--routes picks a model per series; run the rules without --ray, or run --ray once per "
                              "model on the inputs of its rule")
        routes = load_routes(args.routes)
        routes.check_models()
    models = expand_model_args(args.model) if args.model else [default_model_path()]
    if args.model is None and not models[0].exists():
        raise ConfigError(f"the bundled model {models[0]} is missing; pass --model with a checkpoint")
    model = models[0] if len(models) == 1 else models
    formats = tuple(f.strip().lower() for f in args.format.split(",") if f.strip())
    shard = parse_shard(args.shard) if args.shard else (shard_from_env() or (0, 1))
    device = args.device
    if args.shard is None and shard[1] > 1 and device == "auto":
        import torch

        if torch.cuda.is_available():  # torchrun: one GPU per local rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    options = BatchOptions(
        out_dir=Path(args.out),
        formats=formats,
        save_probabilities=args.save_probabilities,
        save_uncertainty=args.uncertainty is not None,
        workers=args.workers,
        shard=shard,
        series_uid=args.series,
        progress=not args.no_progress,
        audit_db=False if args.no_audit else args.audit_db,
        resume=not args.no_resume,
        save_disagreement=len(models) > 1,
    )
    dimse = bool(args.pacs) and str(args.pacs).startswith(("dimse://", "dimses://"))
    finders = args.study or args.accession or args.patient_id
    if args.pacs or finders:
        if not args.pacs or args.inputs:
            raise ConfigError("--pacs URL goes with --study UID (DIMSE also --accession or --patient-id), "
                              "without INPUT paths")
        if not (args.study if not dimse else finders):
            raise ConfigError("--pacs needs --study UID" + (" (or --accession N, or --patient-id ID)" if dimse else ""))
        if not dimse and (args.accession or args.patient_id):
            raise ConfigError("--accession and --patient-id work with a DIMSE archive (--pacs dimse://AET@HOST:PORT)")
    elif not args.inputs:
        raise ConfigError("give INPUT paths to segment, or --pacs URL --study UID")
    ray_opts = None
    if args.ray is not None:
        from resunet.inference.ray_batch import RayOptions, import_ray

        if args.pacs or shard[1] > 1:
            raise ConfigError("--ray runs a whole batch on the cluster: leave out --shard/torchrun and --pacs")
        ray_opts = RayOptions(address=args.ray, actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor,
                              gpus_per_actor=args.ray_gpus_per_actor, max_retries=args.ray_retries)
        import_ray()  # before the model loads: a missing Ray is reported at once
    qr = None
    if dimse:  # the query runs before the model loads: a study that is not there costs nothing
        from resunet.pacs.dimse_qr import DimseSource, QueryConfig, find_studies

        source = DimseSource.parse(args.pacs)
        qr = QueryConfig(calling_aet=args.calling_aet, method=args.retrieve, move_port=args.move_port,
                         tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
        if not args.study:
            found = find_studies(source, qr, accession=args.accession, patient_id=args.patient_id,
                                 date_range=args.date_range)
            if len(found) != 1:
                listed = "; ".join(f"{m.study_uid} ({m.study_date} {m.description})".strip() for m in found[:10])
                raise PacsError(f"{source}: {len(found)} studies match" + (f": {listed}; pick one with --study UID"
                                if found else "; check the accession number / patient ID"))
            args.study = found[0].study_uid
    command = ["resunet", *sys.argv[1:]] if sys.argv and Path(sys.argv[0]).name in ("resunet", "__main__.py") else None
    if routes is not None and args.pacs:
        options.limits = limits_from_args(args)
        return _predict_pacs_routed(routes, args, options, device, options.limits, command, qr)
    cases = discover_cases(args.inputs) if args.inputs else []
    # every input's headers are checked before the model loads; all refusals are reported at once
    from resunet.inference.batch import select_shard
    from resunet.inference.validate import validate_cases, write_refused_summary

    limits = limits_from_args(args)
    options.limits = limits
    mine = select_shard(cases, shard)
    options.refused = validate_cases(mine, args.series, limits, workers=args.workers)
    for case in mine:
        if case.case_id in options.refused:
            print(f"resunet predict: case {case.case_id} refused: {options.refused[case.case_id]}", file=sys.stderr)
    if mine and len(options.refused) == len(mine):
        summary = write_refused_summary(mine, options.refused, options.out_dir, models[0], options.shard, command)
        raise InputError(f"none of the {len(mine)} input(s) can be read (reasons above, and in {summary});"
                         " the model was not loaded")
    if options.refused:
        print(f"resunet predict: {len(options.refused)} of {len(mine)} input(s) refused; segmenting the other "
              f"{len(mine) - len(options.refused)}", file=sys.stderr)
    if routes is not None:
        return _predict_routed(routes, [c for c in mine if c.case_id not in options.refused], options, args, device,
                               limits, command)
    predictor_kwargs = dict(
        tta=args.tta,
        overlap=args.overlap,
        sw_batch=args.sw_batch,
        amp=args.amp,
        postprocess=False if args.no_postprocess else None,
        uncertainty=args.uncertainty,
        limits=limits,
    )
    # with --ray the model loads here on the CPU only for the summary's header; the workers predict
    predictor = Predictor(model, device="cpu" if ray_opts else device, **predictor_kwargs)
    if args.then:  # a chain: each later model segments inside the previous foreground
        from resunet.inference.bundled import resolve_model
        from resunet.inference.chain import ChainPredictor

        if ray_opts is not None:
            raise ConfigError("--then (a model chain) does not run on --ray yet; run the chain without --ray")
        predictor = ChainPredictor([predictor, *(Predictor(resolve_model(m), device=device, **predictor_kwargs)
                                                 for m in args.then)])
    if args.pacs:
        from resunet.pacs import PacsClient, PacsConfig, segment_from_dimse, segment_from_pacs

        if qr is not None:
            run = segment_from_dimse(source, qr, args.study, predictor, options, series_uid=args.series,
                                     store=not args.no_store, command=command)
        else:
            client = PacsClient(PacsConfig.from_env(args.pacs, args.pacs_user))
            run = segment_from_pacs(client, args.study, predictor, options, series_uid=args.series,
                                    store=not args.no_store, command=command)
        stored = f"; stored {', '.join(p.name for p in run.stored)} in study {args.study}" if run.stored else ""
        print(f"resunet predict: study {args.study} from {args.pacs} segmented in {run.timings['segment']:.1f} s "
              f"(pull {run.timings['pull']:.1f} s{', store %.1f s' % run.timings['store'] if 'store' in run.timings else ''})"
              f"{stored}; summary {run.batch.summary_path}", file=sys.stderr)
        return run.batch.exit_code
    retried = ""
    if ray_opts is not None:
        from resunet.inference.ray_batch import PredictorSpec, RayEngine

        worker_device = device if ray_opts.gpus_per_actor or device != "auto" else "cpu"
        # absolute paths: the workers' working folder is not this one
        paths = [str(Path(m).resolve()) if Path(m).exists() else str(m) for m in models]
        spec = PredictorSpec(model=paths if len(paths) > 1 else paths[0],
                             kwargs=dict(predictor_kwargs, device=worker_device),
                             threads=max(1, int(ray_opts.cpus_per_actor)), umask=_current_umask())
        with RayEngine(spec, ray_opts) as engine:
            engine.check(cases, options.out_dir)
            result = run_batch(cases, predictor, options, command=command, engine=engine)
        retried = f", {engine.retried} retried after a lost worker or node"
    else:
        result = run_batch(cases, predictor, options, command=command)
    print(
        f"resunet predict: {result.ok} ok ({result.skipped} skipped as already done), {result.failed} failed"
        f"{retried}; summary {result.summary_path}",
        file=sys.stderr,
    )
    return result.exit_code


def _rule_predictor(rule: Any, args: argparse.Namespace, device: str, limits: Any) -> Any:
    """The Predictor (or chain) of a routing rule, with predict's settings."""
    from resunet.inference import Predictor
    from resunet.inference.bundled import resolve_model
    from resunet.inference.chain import ChainPredictor

    kw = dict(tta=args.tta, overlap=args.overlap, sw_batch=args.sw_batch, amp=args.amp,
              postprocess=False if args.no_postprocess else None, uncertainty=args.uncertainty, limits=limits)
    preds = [Predictor(resolve_model(m), device=device, **kw) for m in rule.models]
    return preds[0] if len(preds) == 1 else ChainPredictor(preds)


def _predict_pacs_routed(routes: Any, args: argparse.Namespace, options: Any, device: str, limits: Any,
                         command: list[str] | None, qr: Any) -> int:
    """``--pacs --routes``: the study pulled once, each series segmented by its rule's model into
    ``OUT/<rule name>/`` and its DICOM outputs stored back; series no rule takes left alone."""
    import logging

    from resunet.pacs.segment import segment_routed

    store = not args.no_store
    if qr is not None:  # DIMSE: C-FIND + C-GET/C-MOVE, C-STORE back
        from resunet.pacs.dimse import Destination, send_files
        from resunet.pacs.dimse_qr import DimseSource, retrieve_study, series_to_retrieve

        source = DimseSource.parse(args.pacs)
        series = series_to_retrieve(source, qr, args.study, args.series)
        dest = Destination(source.host, source.port, source.ae_title)
        fetch = lambda folder: retrieve_study(source, qr, args.study, folder, series)  # noqa: E731
        send = (lambda files: send_files(files, dest, calling_aet=qr.calling_aet, timeout=qr.timeout,
                                         ssl_context=qr.ssl_context(source))) if store else None
    else:  # DICOMweb: WADO-RS in, STOW-RS out
        from resunet.pacs import PacsClient, PacsConfig

        client = PacsClient(PacsConfig.from_env(args.pacs, args.pacs_user))
        fetch = lambda folder: client.retrieve(args.study, folder, [args.series] if args.series else None)  # noqa: E731
        send = (lambda files: client.store(files, args.study)) if store else None
    done = segment_routed(args.study, fetch, send, routes, lambda rule: _rule_predictor(rule, args, device, limits),
                          options, source=args.pacs, command=command, log=logging.getLogger("resunet.predict"))
    for uid, facts in done.unrouted.items():  # once per series; modality and size only (descriptions may hold PHI)
        print(f"resunet predict: series {uid}: no routing rule matches ({facts.modality or '?'}, {facts.n_slices} "
              "slices); left alone", file=sys.stderr)
    for uid, rule_name, run in done.runs:
        stored = f"; stored {', '.join(p.name for p in run.stored)}" if run.stored else ""
        print(f"resunet predict: series {uid} of study {args.study}: rule '{rule_name}', segmented in "
              f"{run.timings['segment']:.1f} s{stored}; summary {run.batch.summary_path}", file=sys.stderr)
    if not done.runs:
        print(f"resunet predict: no series of study {args.study} matched a routing rule; nothing was segmented",
              file=sys.stderr)
    return max((r.batch.exit_code for _, _, r in done.runs), default=0)


def _predict_routed(routes: Any, cases: list[Any], options: Any, args: argparse.Namespace, device: str,
                    limits: Any, command: list[str] | None) -> int:
    """``--routes``: each rule's cases into ``OUT/<rule name>/`` with its model (or chain); exit code as run_batch's."""
    import dataclasses
    import logging

    from resunet.inference import Predictor
    from resunet.inference.batch import run_batch
    from resunet.inference.bundled import resolve_model
    from resunet.inference.chain import ChainPredictor
    from resunet.io.names import safe_name
    from resunet.pacs.routing import route_cases

    groups, left = route_cases(routes, cases, args.series)
    log = logging.getLogger("resunet.predict")
    for case_id, facts in left.items():  # once per case; modality and size only (descriptions may hold PHI)
        if facts is not None:
            routes.log_unrouted(log, case_id, facts)
        what = f"{facts.modality or '?'}, {facts.n_slices} slices" if facts is not None else "no DICOM series"
        print(f"resunet predict: case {case_id}: no routing rule matches ({what}); left alone", file=sys.stderr)
    kw = dict(tta=args.tta, overlap=args.overlap, sw_batch=args.sw_batch, amp=args.amp,
              postprocess=False if args.no_postprocess else None, uncertainty=args.uncertainty, limits=limits)
    codes = []
    for rule, taken in groups:
        preds = [Predictor(resolve_model(m), device=device, **kw) for m in rule.models]
        predictor = preds[0] if len(preds) == 1 else ChainPredictor(preds)
        opts = dataclasses.replace(options, out_dir=options.out_dir / safe_name(rule.name, "rule"), route=rule.name,
                                   refused={})
        result = run_batch(taken, predictor, opts, command=command)
        print(f"resunet predict: rule '{rule.name}' ({' -> '.join(rule.models)}): {len(taken)} case(s); summary "
              f"{result.summary_path}", file=sys.stderr)
        codes.append(result.exit_code)
    if not groups:
        print("resunet predict: no input matched a routing rule; nothing was segmented", file=sys.stderr)
    return max(codes, default=0)
