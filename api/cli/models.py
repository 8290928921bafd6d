"""`actmap models list|register`: the models a scan may name.

Through the API (`--api` or $ACTMAP_API_URL) these are the tenant's registered models.
Embedded and on a broker a scan takes a `.pt2` path or `package.module:factory` directly,
plus the names bundled with actmap; registering is the API's (it checks and keeps the
files), so `register` without an API is refused with what to do instead.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from api.cli import output
from workers.errors import UserError
from workers.settings import Settings

__all__ = ["add_parsers", "run"]


def add_parsers(sub: Any) -> None:
    models = sub.add_parser("models", help="list or register the models a scan may name")
    action = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = action.add_parser("list", help="registered models (bundled names embedded)")
    register = action.add_parser("register", help="register a model with the API")
    register.add_argument("name", metavar="NAME", help="the name scans give as --model")
    register.add_argument("--archive", help="a torch.export .pt2 file to upload")
    register.add_argument("--weights", help="safetensors weights to upload, with --factory")
    register.add_argument("--factory", help="package.module:factory the server allows")
    register.add_argument("--path", help="a model file on the server, beneath your roots")
    for one in (listing, register):
        one.add_argument("--api", help="through this API (default $ACTMAP_API_URL)")
        one.add_argument("--token", help="the API's bearer token (default $ACTMAP_TOKEN)")
        one.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = args.api or settings.api_url
    if url is None:
        return _local(args)
    from api.client import Client

    token = settings.token.get_secret_value() if settings.token else None
    with Client(url, token) as client:
        if args.action == "register":
            if not (args.archive or args.weights or args.path):
                raise UserError(
                    "give the model: --archive F.pt2, --weights W --factory F, or --path P"
                )
            model_id = client.register_model(
                args.name, args.archive, args.weights, args.factory, args.path
            )
            found = client.request("GET", f"/v1/models/{model_id}").json()
            _show([found], args.json, single=True)
            return 0
        _show(client.request("GET", "/v1/models").json(), args.json)
    return 0


def _local(args: argparse.Namespace) -> int:
    if args.action == "register":
        raise UserError(
            "registering a model needs the API (--api URL or $ACTMAP_API_URL); embedded and "
            "on a broker, scan with --model FILE.pt2 or --model package.module:factory"
        )
    from workers.execution.registration import bundled  # embedded: torch is installed here

    rows = [
        {"id": name, "name": name, "state": "ready", "factory": factory, "weights": str(w)}
        for name, (factory, w) in bundled().items()
    ]
    _show(rows, args.json)
    return 0


def _show(models: list[dict[str, Any]], as_json: bool, single: bool = False) -> None:
    if as_json:
        shown = [{k: v for k, v in m.items() if k != "catalogue"} for m in models]
        output.print_json(shown[0] if single else {"models": shown})
        return
    table = Table("name", "id", "state", "detail")
    for m in models:
        detail = m.get("error") or m.get("factory") or m.get("created") or ""
        table.add_row(m["name"], m["id"], m["state"], str(detail))
    output.out.print(table)
