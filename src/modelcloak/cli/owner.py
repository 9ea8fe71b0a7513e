"""`modelcloak serve` and `modelcloak owner ...`: the owner backend's commands (logic in modelcloak.owner)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import out
from modelcloak.owner.errors import OwnerError

DB_ENV = "MODELCLOAK_OWNER_DB"
DatabaseOpt = Annotated[
    Optional[str],
    typer.Option("--db", help=f"SQLite file or postgresql:// URL (default: ${DB_ENV}, else modelcloak-owner.db)."),
]
MasterFileOpt = Annotated[
    Optional[Path], typer.Option("--master-key-file", help="File holding the master key that seals stored keys.")
]
MasterEnvOpt = Annotated[
    Optional[str], typer.Option("--master-key-env", help="Environment variable holding the master key (hex/base64).")
]
CustomerOpt = Annotated[
    Optional[str], typer.Option("--customer", help="The customer (tenant) the device or licence belongs to.")
]
MeasurementOpt = Annotated[
    Optional[list[str]], typer.Option("--measurement", "-m", help="Expected measurement NAME=HEX (repeat).")
]


def _database(db: str | None) -> str:
    from modelcloak.owner.server import DEFAULT_DATABASE

    return db or os.environ.get(DB_ENV) or DEFAULT_DATABASE


def _shown(database: str) -> str:
    """The database for printing: a URL's password masked (terminals and logs are not secret stores)."""
    from modelcloak.owner.store import redacted

    return redacted(database)


def _master_provider(master_key_file: Path | None, master_key_env: str | None, *, required: bool) -> Any:
    from modelcloak.keys import EnvKey, KeyFile

    if master_key_file and master_key_env:
        raise OwnerError("give one of --master-key-file and --master-key-env, not both")
    if master_key_file:
        return KeyFile(master_key_file)
    if master_key_env:
        return EnvKey(master_key_env)
    if required:
        raise OwnerError("this needs the master key: give --master-key-file or --master-key-env")
    return None


def _service(db: str | None, master_key_file: Path | None, master_key_env: str | None, *, master: bool) -> Any:
    from modelcloak.owner.service import OwnerService
    from modelcloak.owner.store import MasterKey, Store

    provider = _master_provider(master_key_file, master_key_env, required=master)
    master_key = MasterKey.from_provider(provider) if provider is not None else None
    # Only commands that write with the master key migrate; read-only ones refuse an old schema instead.
    return OwnerService(Store(_database(db), migrate_schema=master), master_key)


def _measurements(pairs: list[str] | None) -> dict[str, str]:
    parsed = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise OwnerError(f"--measurement {pair!r} must look like NAME=HEX")
        parsed[name.strip()] = value.strip()
    return parsed


def register(app: typer.Typer) -> None:
    """Add `serve` and the `owner` sub-app to the main CLI."""
    owner_app = typer.Typer(no_args_is_help=True, help="Owner backend: models, devices, licences, usage.")
    model_app = typer.Typer(no_args_is_help=True, help="Models whose keys the backend releases.")
    device_app = typer.Typer(no_args_is_help=True, help="Devices and what their evidence must show.")
    licence_app = typer.Typer(no_args_is_help=True, help="Licences: issue, revoke, list.")
    owner_app.add_typer(model_app, name="model")
    owner_app.add_typer(device_app, name="device")
    owner_app.add_typer(licence_app, name="licence")
    app.add_typer(owner_app, name="owner")
    app.command()(serve)
    owner_app.command("init")(init)
    owner_app.command("migrate")(migrate_command)
    owner_app.command("rotate-master-key")(rotate_master_key)
    owner_app.command("backup")(backup)
    model_app.command("register")(model_register)
    device_app.command("enroll")(device_enroll)
    licence_app.command("issue")(licence_issue)
    licence_app.command("revoke")(licence_revoke)
    licence_app.command("pin")(licence_pin)
    licence_app.command("free-instance")(licence_free_instance)
    licence_app.command("list")(licence_list)
    owner_app.command("usage")(usage)
    owner_app.command("sim-device")(sim_device)


def serve(
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8443,
    ssl_certfile: Annotated[Optional[str], typer.Option("--tls-cert", help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Optional[str], typer.Option("--tls-key", help="TLS private key (PEM).")] = None,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a request's headers may take to arrive (408 after; 0: no deadline).")
    ] = 10.0,
    trusted_proxy: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Address of a reverse proxy whose X-Forwarded-For is believed (repeatable; none by default)."
        ),
    ] = None,
) -> None:
    """Run the owner backend's HTTP API (key release, usage reports); migrates the database first."""
    from modelcloak.owner.server import serve as run_server

    provider = _master_provider(master_key_file, master_key_env, required=True)
    out.print(f"owner backend on {host}:{port}, database {_shown(_database(db))}", highlight=False)
    run_server(
        _database(db),
        provider,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        header_timeout=header_timeout,
        trusted_proxies=trusted_proxy or (),
    )


def init(
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Create (or migrate) the database, and the master key file if it does not exist yet."""
    from modelcloak.keys import generate_key_file
    from modelcloak.owner.store import MasterKey, Store, schema_revision

    if master_key_file is not None and not master_key_file.exists():
        generate_key_file(master_key_file)
        out.print(f"wrote a new master key to {master_key_file} (mode 0600); back it up, away from the database")
    provider = _master_provider(master_key_file, master_key_env, required=True)
    MasterKey.from_provider(provider)
    store = Store(_database(db))
    try:
        revision = schema_revision(store.engine)
        out.print(f"database {_shown(_database(db))} at schema revision {revision}", highlight=False)
    finally:
        store.close()


def migrate_command(
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Bring the schema to the newest revision and tag rows made before integrity tags existed."""
    from modelcloak.owner.store import schema_revision

    service = _service(db, master_key_file, master_key_env, master=True)
    try:
        tagged = service.tag_untagged_rows()
        revision = schema_revision(service.store.engine)
    finally:
        service.store.close()
    out.print(f"database at schema revision {revision}; tagged {tagged} untagged row(s)", highlight=False)


def rotate_master_key(
    new_master_key_file: Annotated[
        Path, typer.Option("--new-master-key-file", help="The new master key (created, 0600, if missing).")
    ],
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Re-seal every stored key and re-tag every licence and device under a new master key (stop `serve` first)."""
    from modelcloak.keys import KeyFile, generate_key_file
    from modelcloak.owner.store import MasterKey

    if not new_master_key_file.exists():
        generate_key_file(new_master_key_file)
    new = MasterKey.from_provider(KeyFile(new_master_key_file))
    service = _service(db, master_key_file, master_key_env, master=True)
    try:
        counts = service.rotate_master_key(new)
    finally:
        service.store.close()
    rewritten = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    out.print(f"rotated to {new_master_key_file}: re-sealed/re-tagged {rewritten}; restart `serve` with it")


def backup(
    destination: Annotated[Path, typer.Argument(help="New SQLite file to write the copy to.")],
    db: DatabaseOpt = None,
) -> None:
    """A consistent copy of a SQLite database while it is in use (PostgreSQL: use pg_dump, docs/OWNER.md)."""
    from modelcloak.owner.store import backup_sqlite

    backup_sqlite(_database(db), destination)
    out.print(f"backed up {_shown(_database(db))} to {destination} (0600)", highlight=False)


def model_register(
    model_id: Annotated[str, typer.Argument(help="Name for the model (used by licences).")],
    model_key_file: Annotated[Path, typer.Option("--model-key-file", help="The key the bundle was sealed with.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    fhe_secret: Annotated[
        Optional[Path],
        typer.Option("--fhe-secret", help="fhe bundles: the secret `protect --fhe-secret-out` wrote."),
    ] = None,
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Store a model's key (sealed under the master key) so licences can release it."""
    from modelcloak.keys import KeyFile

    service = _service(db, master_key_file, master_key_env, master=True)
    secret = None
    if fhe_secret is not None:
        try:
            secret = fhe_secret.read_bytes()
        except OSError as exc:
            raise OwnerError(f"cannot read {fhe_secret}: {exc.strerror}") from None
    with KeyFile(model_key_file).key_for({}) as key:
        service.register_model(model_id, bytes(key.view()), description)
    out.print(f"registered model {model_id}", highlight=False)
    if secret is not None:
        fhe_id = service.register_fhe_secret(model_id, secret)
        out.print(f"stored its FHE secret (model id {fhe_id}); the decryption service can now answer", highlight=False)


def device_enroll(
    device_id: Annotated[str, typer.Argument(help="Name for the device.")],
    kind: Annotated[str, typer.Option("--kind", help="Evidence kind: sim, tpm, nitro, sev-snp, sgx-dcap.")],
    measurement: MeasurementOpt = None,
    identity: Annotated[
        Optional[str], typer.Option("--identity", help="Fingerprint of the device's attestation key (hex).")
    ] = None,
    customer: CustomerOpt = None,
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Enrol a device: its evidence kind, attestation identity, expected measurements and customer."""
    # The master key tags the row, so that a database write alone cannot change what it admits.
    service = _service(db, master_key_file, master_key_env, master=True)
    service.enroll_device(device_id, kind, _measurements(measurement), identity, customer=customer)
    warning = " (sim: INSECURE, development only)" if kind == "sim" else ""
    out.print(f"enrolled device {device_id}{warning}", highlight=False)


def licence_issue(
    model: Annotated[str, typer.Option("--model", help="Registered model id.")],
    device: Annotated[Optional[str], typer.Option("--device", help="Bind to this enrolled device.")] = None,
    instances: Annotated[
        Optional[int], typer.Option("--instances", help="Or: at most N instances of --customer's devices.")
    ] = None,
    customer: CustomerOpt = None,
    days: Annotated[float, typer.Option("--days", help="Valid for this many days.")] = 365.0,
    quota: Annotated[Optional[int], typer.Option("--quota", help="Query quota (default: unlimited).")] = None,
    revalidate: Annotated[int, typer.Option("--revalidate", help="Online revalidation period, seconds.")] = 3600,
    grace: Annotated[int, typer.Option("--grace", help="Offline grace period, seconds.")] = 86400,
    allow_sim: Annotated[
        bool, typer.Option("--allow-sim", help="Accept INSECURE sim evidence (development only).")
    ] = False,
    allow_debug: Annotated[bool, typer.Option("--allow-debug", help="Accept debug enclaves/VMs.")] = False,
    measurement: MeasurementOpt = None,
    min_serial: Annotated[
        Optional[int],
        typer.Option(
            "--min-serial", help="Devices refuse bundles with an older serial (`protect --serial`; rollback pin)."
        ),
    ] = None,
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Issue a licence and print its id."""
    if not 0 < days < 100 * 365:
        raise OwnerError("--days must be between 0 and 36500")
    service = _service(db, master_key_file, master_key_env, master=True)
    licence_id = service.issue_licence(
        model,
        device_id=device,
        max_instances=instances,
        customer=customer,
        valid_for=timedelta(days=days),
        query_quota=quota,
        revalidate_seconds=revalidate,
        offline_grace_seconds=grace,
        allow_sim=allow_sim,
        allow_debug=allow_debug,
        measurements=_measurements(measurement) or None,
        min_serial=min_serial,
    )
    out.print(licence_id, highlight=False)


def licence_pin(
    licence_id: Annotated[str, typer.Argument(help="Licence to pin.")],
    min_serial: Annotated[
        Optional[int], typer.Option("--min-serial", help="Oldest bundle serial its devices may run (omit: no pin).")
    ] = None,
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Set or clear a licence's minimum bundle serial; devices apply it at their next key release."""
    _service(db, master_key_file, master_key_env, master=True).pin_serial(licence_id, min_serial)
    pinned = "no minimum serial" if min_serial is None else f"minimum serial {min_serial}"
    out.print(f"{licence_id}: {pinned}", highlight=False)


def licence_revoke(
    licence_id: Annotated[str, typer.Argument(help="Licence to revoke.")],
    reason: Annotated[str, typer.Option(help="Shown to the runtime.")] = "revoked by the owner",
    db: DatabaseOpt = None,
    master_key_file: MasterFileOpt = None,
    master_key_env: MasterEnvOpt = None,
) -> None:
    """Revoke a licence: later key releases and usage reports are refused with REASON."""
    _service(db, master_key_file, master_key_env, master=True).revoke_licence(licence_id, reason)
    out.print(f"revoked {licence_id}", highlight=False)


def licence_free_instance(
    licence_id: Annotated[str, typer.Argument(help="Instance licence.")],
    instance_id: Annotated[Optional[str], typer.Argument(help="Instance to free (omit to list them).")] = None,
    db: DatabaseOpt = None,
) -> None:
    """List an instance licence's instances, or free one's slot (a retired or reinstalled device)."""
    service = _service(db, None, None, master=False)
    if instance_id is None:
        table = Table("instance", "device", "first seen", "last seen")
        for row in service.instances(licence_id):
            table.add_row(row["instance"], row["device"], row["first_seen"][:19], row["last_seen"][:19])
        out.print(table)
        return
    service.free_instance(licence_id, instance_id)
    out.print(f"freed instance {instance_id} of {licence_id}", highlight=False)


def licence_list(
    db: DatabaseOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List licences with their terms and use."""
    rows = _service(db, None, None, master=False).licences()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("licence", "model", "bound to", "expires", "used / quota", "state")
    for row in rows:
        bound = row["device"] or f"{row['instances']}/{row['max_instances']} instances"
        quota = "unlimited" if row["query_quota"] is None else str(row["query_quota"])
        state = "revoked" if row["revoked"] else "active"
        if row["allow_sim"]:
            state += ", sim allowed (INSECURE)"
        if row["min_serial"] is not None:
            state += f", serial >= {row['min_serial']}"
        table.add_row(row["id"], row["model"], bound, row["expires_at"][:19], f"{row['queries_used']} / {quota}", state)
    out.print(table)


def usage(
    licence: Annotated[Optional[str], typer.Option("--licence", help="Only this licence.")] = None,
    db: DatabaseOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Acknowledged usage per licence and reporter."""
    rows = _service(db, None, None, master=False).usage(licence)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("licence", "reporter", "batches", "queries")
    for row in rows:
        table.add_row(row["licence"], row["reporter"], str(row["last_sequence"]), str(row["queries"]))
    out.print(table)


def sim_device(
    key_path: Annotated[Path, typer.Argument(help="Where to write the sim device's Ed25519 key (PEM).")],
) -> None:
    """Create an INSECURE simulated device key (development only) and print its identity for `device enroll`."""
    from modelcloak.owner.evidence.sim import SimDevice

    device = SimDevice.create(key_path)
    out.print(f"{device.identity}", highlight=False)
