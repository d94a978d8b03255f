"""`billing notifications list|mark-delivered`: the allowance notifications outbox, for a mail or webhook sender."""

from __future__ import annotations

from billing_dags.cli.common import emit, paths_of, require_customer


def register(sub) -> None:
    p = sub.add_parser("notifications", help="allowance notifications (80%%/100%% of an allowance): list them, mark them delivered")
    nsub = p.add_subparsers(dest="notifications_command", required=True, metavar="ACTION")
    lp = nsub.add_parser("list", help="notifications not delivered yet (--all: every one)")
    lp.add_argument("--all", action="store_true", help="delivered ones too")
    lp.add_argument("--customer", help="only this customer")
    lp.add_argument("--format", choices=["table", "json", "csv"], default="table")
    lp.set_defaults(func=cmd_list)
    mp = nsub.add_parser("mark-delivered", help="record that a sender delivered these notifications (idempotent)")
    mp.add_argument("ids", nargs="+", metavar="ID", help="notification ids (ntf_...)")
    mp.add_argument("--channel", required=True, help="how they were delivered, e.g. email or webhook")
    mp.set_defaults(func=cmd_mark)


def cmd_list(args) -> int:
    from billing_dags.operations import notifications

    paths = paths_of(args)
    if args.customer:
        require_customer(paths, args.customer)
    rows = notifications.outbox(paths) if args.all else notifications.pending(paths)
    if args.customer:
        rows = [n for n in rows if n["customer_id"] == args.customer]
    if args.format == "json":
        emit(rows, "json")
        return 0
    done = notifications.delivered(paths)
    table = [
        {
            "id": n["id"],
            "day": n["day"],
            "customer": n["customer_id"],
            "meter": n["meter_id"],
            "threshold": f"{n['threshold_percent']}%",
            "used": f"{n['quantity']} of {n['allowance']} {n['unit']}",
            "delivered": done[n["id"]]["delivered_at"] if n["id"] in done else "",
        }
        for n in rows
    ]
    emit(table, args.format, title=f"Allowance notifications ({len(table)}{'' if args.all else ' pending'})")
    return 0


def cmd_mark(args) -> int:
    from billing_dags.operations import notifications

    new = notifications.mark_delivered(paths_of(args), args.ids, args.channel)
    print(f"{len(new)} marked delivered ({len(args.ids) - len(new)} already were)")
    return 0
