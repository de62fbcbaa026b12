"""``resunet audit verify DIR`` / ``resunet audit log``: check a report's files and the audit log."""

from __future__ import annotations

import argparse

from resunet.reports.audit import ENV_VAR, describe_db, read_runs, verify, verify_log


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="verify a report's file hashes; list the audit log",
                              description="Audit trail of predict and evaluate runs.")  # fmt: skip
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    v = sub.add_parser(
        "verify",
        help="recompute the SHA-256 of every file a report lists; exit 1 if any changed or is missing",
        description="Recompute the SHA-256 of every file listed in DIR/metrics.json and DIR/predictions.json "
        "(inputs, predictions, references, model and the report's own outputs) and name each file that "
        "changed or is missing since the report was made. Exit code 0: all unchanged; 1: something changed.",
    )
    v.add_argument("dir", help="report folder (holding metrics.json and/or predictions.json), or one of those files")
    v.add_argument("--audit-db", metavar="PATH", help=f"audit log (default ${ENV_VAR} or ~/.resunet/audit.sqlite)")
    v.set_defaults(func=run_verify)
    lg = sub.add_parser("log", help="list the runs in the audit log and check its hash chain")
    lg.add_argument("--audit-db", metavar="PATH", help=f"audit log: a SQLite file or postgresql://USER@HOST/DB (password from $PGPASSWORD/$PGPASSFILE); "
                    f"default ${ENV_VAR} or ~/.resunet/audit.sqlite")
    lg.add_argument("--last", type=int, default=20, metavar="N", help="show the last N runs (default 20)")
    lg.set_defaults(func=run_log)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_verify(args: argparse.Namespace) -> int:
    res = verify(args.dir, db_path=args.audit_db)
    for c in res.checks:
        if c.status == "changed":
            print(f"CHANGED  {c.path} (listed in {c.listed_in}): sha256 now {c.actual_sha256}, "
                  f"recorded {c.expected_sha256}")  # fmt: skip
        elif c.status == "missing":
            print(f"MISSING  {c.path} (listed in {c.listed_in})")
    for prob in res.problems:
        print(f"CHANGED  {prob}")
    for note in res.notes:
        print(f"note: {note}")
    n_ok = sum(c.status == "ok" for c in res.checks)
    if res.ok:
        print(f"OK: all {n_ok} listed files unchanged in {res.folder}")
        return 0
    print(f"FAILED: {len(res.changed) + len(res.problems)} changed, {len(res.missing)} missing, {n_ok} unchanged")
    return 1


def run_log(args: argparse.Namespace) -> int:
    db = args.audit_db  # a SQLite file or postgresql://USER@HOST/DB (the log of a shared service queue)
    runs = read_runs(db)
    for r in runs[-max(args.last, 0):] if args.last else []:
        print(f"{r['seq']:>5} {r['recorded_utc']} {r['kind']:<9} {r['run_id']} {r['user']}@{r['host']}: {r['command']}")
    problems = verify_log(db)
    for p in problems:
        print(f"ALTERED  {p}")
    print(f"{len(runs)} runs in {describe_db(db)}; hash chain {'broken' if problems else 'intact'}")
    return 1 if problems else 0
