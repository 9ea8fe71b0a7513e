"""`modelcloak` commands. Every failure the user can act on is one line on stderr and exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from modelcloak.errors import ModelcloakError

try:  # recent typer releases vendor click under typer._click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses the click package
    from click.exceptions import ClickException
from typer import Abort

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Protect neural networks shipped to machines you do not control.",
)
out = Console()
err = Console(stderr=True)

KeyFileOpt = Annotated[Optional[Path], typer.Option("--key-file", help="File holding the 256-bit model key.")]
KeyEnvOpt = Annotated[
    Optional[str], typer.Option("--key-env", help="Environment variable holding the key (hex/base64).")
]
PassEnvOpt = Annotated[
    Optional[str],
    typer.Option("--passphrase-env", help="Environment variable holding a passphrase (scrypt-derived key)."),
]
PassPromptOpt = Annotated[bool, typer.Option("--passphrase", help="Prompt for a passphrase.")]


def _key_provider(key_file: Path | None, key_env: str | None, passphrase_env: str | None, passphrase: bool):
    from modelcloak.keys import EnvKey, KeyFile, KeyProviderError, Passphrase

    chosen = [x for x in (key_file, key_env, passphrase_env, passphrase or None) if x]
    if len(chosen) != 1:
        raise KeyProviderError("give exactly one key source: --key-file, --key-env, --passphrase-env or --passphrase")
    if key_file:
        return KeyFile(key_file)
    if key_env:
        return EnvKey(key_env)
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise KeyProviderError(f"environment variable {passphrase_env} is not set")
        return Passphrase(value)
    if not sys.stdin.isatty():
        raise KeyProviderError("--passphrase prompts on a terminal and there is none; use --passphrase-env VAR")
    return Passphrase(typer.prompt("Passphrase", hide_input=True))


@app.command()
def protect(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Bundle to write.")],
    scheme: Annotated[str, typer.Option(help="Protection scheme.")] = "seal",
    key_file: KeyFileOpt = None,
    key_env: KeyEnvOpt = None,
    passphrase_env: PassEnvOpt = None,
    passphrase: PassPromptOpt = False,
    sign_key: Annotated[
        Optional[Path], typer.Option("--sign-key", help="Ed25519 private key (PEM) to sign with.")
    ] = None,
    label: Annotated[Optional[str], typer.Option(help="Free-text label stored in the manifest.")] = None,
    serial: Annotated[
        Optional[int], typer.Option("--serial", min=0, help="Release number devices can require (--min-serial).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle.")] = False,
    cut_after: Annotated[Optional[str], typer.Option("--cut-after", help="split: last public node.")] = None,
    cut_tensors: Annotated[
        Optional[str], typer.Option("--cut-tensors", help="split: comma-separated boundary tensors.")
    ] = None,
    cut_last: Annotated[
        Optional[int], typer.Option("--cut-last", help="split: keep the last N layers private.")
    ] = None,
    cut_index: Annotated[
        Optional[int], typer.Option("--cut-index", help="split: candidate number from `splits`.")
    ] = None,
    enclave_key_file: Annotated[
        Optional[Path], typer.Option("--enclave-key-file", help="split: key that only the enclave receives.")
    ] = None,
    output_policy: Annotated[
        str, typer.Option("--output-policy", help="split: label, topk:K or scores (weakens protection).")
    ] = "label",
    query_budget: Annotated[
        Optional[int], typer.Option("--query-budget", help="split: samples one enclave session may answer.")
    ] = None,
    rate_limit: Annotated[Optional[float], typer.Option("--rate-limit", help="split: samples per second.")] = None,
    lock_to: Annotated[
        Optional[list[Path]],
        typer.Option("--lock-to", help="lock, split: a device's exported lock key file (repeat for more devices)."),
    ] = None,
    lock_method: Annotated[
        str, typer.Option("--lock-method", help="uniform-shift (default), or plain-aes/permutation to compare.")
    ] = "uniform-shift",
    fhe_secret_out: Annotated[
        Optional[Path], typer.Option("--fhe-secret-out", help="fhe: where the owner's CKKS secret goes (0600).")
    ] = None,
    fhe_activation: Annotated[
        str, typer.Option("--fhe-activation", help="fhe: square, modified-square, relu-poly or none.")
    ] = "square",
    fhe_security: Annotated[int, typer.Option("--fhe-security", help="fhe: 128, 192 or 256 bits.")] = 128,
    fhe_calibration: Annotated[
        Optional[Path], typer.Option("--fhe-calibration", help="fhe relu-poly: .npy of model inputs for the range.")
    ] = None,
    fhe_plain_weights: Annotated[
        bool, typer.Option("--fhe-plain-weights", help="fhe: encode the weights instead of encrypting them.")
    ] = False,
) -> None:
    """Protect MODEL into an encrypted, optionally signed bundle (seal; split with --cut-*; lock with --lock-to)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from modelcloak.protector import protect as do_protect

    if output.exists() and not force:
        raise ModelcloakError(f"{output} already exists; pass --force to overwrite it")
    if output.resolve() == model.resolve():
        raise ModelcloakError("the bundle path must differ from the model path")
    provider = _key_provider(key_file, key_env, passphrase_env, passphrase)
    selectors = {
        "after_node": cut_after,
        "tensors": [t for t in cut_tensors.split(",") if t] if cut_tensors else None,
        "last": cut_last,
        "index": cut_index,
    }
    selectors = {name: value for name, value in selectors.items() if value is not None}
    split_options: dict[str, Any] = {}
    if scheme == "split":
        from modelcloak.keys import KeyFile

        if len(selectors) != 1:
            raise ModelcloakError(
                "scheme split needs exactly one of --cut-after, --cut-tensors, --cut-last, --cut-index"
            )
        if enclave_key_file is None:
            raise ModelcloakError("scheme split needs --enclave-key-file (create one with `modelcloak keygen`)")
        policy = {"output": output_policy, "query_budget": query_budget, "rate_limit_per_s": rate_limit}
        split_options = {"cut": selectors, "enclave_key": KeyFile(enclave_key_file), "policy": policy}
    elif scheme == "fhe":
        if len(selectors) != 1:
            raise ModelcloakError("scheme fhe needs exactly one of --cut-after, --cut-tensors, --cut-last, --cut-index")
        if fhe_secret_out is None:
            raise ModelcloakError("scheme fhe needs --fhe-secret-out FILE for the owner's secret key")
        calibration = _load_inputs(fhe_calibration) if fhe_calibration is not None else None
        fhe_options = {
            "secret_out": fhe_secret_out,
            "activation": fhe_activation,
            "security": fhe_security,
            "encrypt_weights": not fhe_plain_weights,
            "calibration": calibration,
        }
        split_options = {"cut": selectors, "fhe": fhe_options}
    elif selectors or enclave_key_file:
        raise ModelcloakError("--cut-* and --enclave-key-file only apply to --scheme split and fhe")
    if lock_to:
        from modelcloak.keys.device import DeviceLockKey

        split_options["lock_to"] = [DeviceLockKey.from_file(path) for path in lock_to]
        split_options["lock_method"] = lock_method
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("encrypting", total=None)
        manifest = do_protect(
            model,
            output,
            key=provider,
            scheme=scheme,
            signer=sign_key,
            label=label,
            serial=serial,
            progress=lambda n: bar.advance(task, n),
            **split_options,
        )
    signed = "signed" if manifest.signer_public_key else "unsigned"
    size = output.stat().st_size
    out.print(f"wrote {output} ({size:,} bytes, scheme {manifest.scheme}, key id {manifest.key_id}, {signed})")


def _owner_key(
    url: str,
    licence: str | None,
    device_id: str | None,
    instance_id: str | None,
    attest: str,
    sim_key: Path | None,
    measurements: list[str] | None,
    tcti: str | None,
) -> Any:
    """The owner backend as key source, with the device's evidence (TPM quote, or INSECURE sim)."""
    from modelcloak.owner.client import OwnerBackendKey

    if not licence or not device_id:
        raise ModelcloakError("--owner-url needs --licence and --device-id")
    if attest == "tpm":
        from modelcloak.keys.tpm_attest import TpmAttester

        attester: Any = TpmAttester(tcti=tcti)
    elif attest == "sim":
        from modelcloak.owner.client import SimAttester
        from modelcloak.owner.evidence.sim import SimDevice

        if sim_key is None:
            raise ModelcloakError("--attest sim needs --sim-key (created by `modelcloak owner sim-device`)")
        claimed = {}
        for item in measurements or []:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise ModelcloakError(f"--measurement must be NAME=HEX, got {item!r}")
            claimed[name] = value.lower()
        err.print("modelcloak: warning: sim evidence is INSECURE (development only)", highlight=False)
        attester = SimAttester(SimDevice(sim_key), claimed)
    else:
        raise ModelcloakError(f"--attest must be tpm or sim, got {attest!r}")
    # One instance id per runtime: its usage batches form one sequence, kept in --usage-state.
    return OwnerBackendKey(
        url, licence_id=licence, device_id=device_id, attester=attester, instance_id=instance_id or device_id
    )


def _load_inputs(path: Path) -> dict[str, Any] | Any:
    from modelcloak.cli.run_io import load_inputs

    return load_inputs(path)


@app.command()
def run(
    bundle: Annotated[Path, typer.Argument(help="Sealed bundle.")],
    inputs: Annotated[Path, typer.Argument(help=".npy (single input) or .npz (one array per input name).")],
    output: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Save outputs to .npz instead of printing.")
    ] = None,
    key_file: KeyFileOpt = None,
    key_env: KeyEnvOpt = None,
    passphrase_env: PassEnvOpt = None,
    passphrase: PassPromptOpt = False,
    backend: Annotated[str, typer.Option(help="onnxruntime or openvino.")] = "onnxruntime",
    trusted_signer: Annotated[
        Optional[list[Path]],
        typer.Option("--trusted-signer", help="Owner public key (PEM); makes a signature mandatory."),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse to run when any on-disk cache is enabled.")] = False,
    min_serial: Annotated[
        Optional[int],
        typer.Option("--min-serial", min=0, help="Refuse bundles older than this serial (needs --trusted-signer)."),
    ] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads for onnxruntime.")] = None,
    cast: Annotated[
        bool, typer.Option("--cast", help="Convert inputs to the model's types (never wraps integers).")
    ] = False,
    enclave_key_file: Annotated[
        Optional[Path], typer.Option("--enclave-key-file", help="split bundles: the enclave's key file.")
    ] = None,
    enclave_key_env: Annotated[
        Optional[str], typer.Option("--enclave-key-env", help="split bundles: variable holding the enclave key.")
    ] = None,
    device_state: Annotated[
        Optional[Path], typer.Option("--device-state", help="locked bundles: this device's enrolment directory.")
    ] = None,
    tcti: Annotated[
        Optional[str], typer.Option(help="TPM connection (default: $TPM2TOOLS_TCTI, $TSS2_TCTI, /dev/tpmrm0).")
    ] = None,
    fhe_result: Annotated[
        Optional[Path], typer.Option("--fhe-result", help="fhe bundles: write the encrypted result here.")
    ] = None,
    encrypt_features: Annotated[
        bool, typer.Option("--encrypt-features", help="fhe bundles: also encrypt the head's inputs.")
    ] = False,
    owner_url: Annotated[
        Optional[str], typer.Option("--owner-url", help="Get the key from the owner backend (attested release).")
    ] = None,
    licence: Annotated[Optional[str], typer.Option("--licence", help="owner backend: licence id.")] = None,
    device_id: Annotated[Optional[str], typer.Option("--device-id", help="owner backend: this device's id.")] = None,
    attest: Annotated[str, typer.Option("--attest", help="owner backend evidence: tpm, or sim (INSECURE).")] = "tpm",
    sim_key: Annotated[Optional[Path], typer.Option("--sim-key", help="--attest sim: the sim device key.")] = None,
    measurement: Annotated[
        Optional[list[str]], typer.Option("--measurement", help="--attest sim: NAME=HEX it claims (repeat).")
    ] = None,
    usage_state: Annotated[
        Optional[Path], typer.Option("--usage-state", help="owner backend: file keeping unsent usage counts.")
    ] = None,
    instance_id: Annotated[
        Optional[str],
        typer.Option("--instance-id", help="owner backend: this runtime instance (default: the device id)."),
    ] = None,
) -> None:
    """Verify and decrypt BUNDLE in memory and run it on INPUTS (fhe: write the encrypted result)."""

    from modelcloak.cli.run_io import check_output_path, output_lines, save_outputs
    from modelcloak.runtime import load

    feeds = _load_inputs(inputs)
    if output is not None:
        check_output_path(output)
    owner_key = None
    if owner_url is not None:
        if key_file or key_env or passphrase_env or passphrase:
            raise ModelcloakError("--owner-url is the key source: do not also give --key-file/--key-env/--passphrase")
        owner_key = _owner_key(owner_url, licence, device_id, instance_id, attest, sim_key, measurement, tcti)
        provider = owner_key
    else:
        provider = _key_provider(key_file, key_env, passphrase_env, passphrase)
    device_key = None
    if device_state is not None:
        from modelcloak.keys.device import open_device_key

        device_key = open_device_key(device_state, tcti=tcti)
    with load(
        bundle,
        key=provider,
        device_key=device_key,
        backend=backend,
        trusted_signers=trusted_signer,
        threads=threads,
        cache_policy="strict" if strict else "override",
        min_serial=min_serial,
        enclave_key_file=enclave_key_file,
        enclave_key_env=enclave_key_env,
    ) as session:
        if owner_key is not None:
            from modelcloak.runtime.metering import LicensedUse

            if usage_state is None:
                raise ModelcloakError("--owner-url needs --usage-state FILE to keep usage counts across restarts")
            session.licence = LicensedUse(owner_key, usage_state)
            session.licence.start()
        if getattr(session, "evaluator", None) is not None:
            if fhe_result is None:
                raise ModelcloakError("this is an fhe bundle: its result is encrypted; give --fhe-result FILE")
            data = session.evaluate(feeds, encrypt_features=encrypt_features)
            fhe_result.write_bytes(data)
            out.print(f"wrote the encrypted result ({len(data):,} bytes) to {fhe_result}; the owner decrypts it")
            return
        if fhe_result is not None or encrypt_features:
            raise ModelcloakError("--fhe-result and --encrypt-features apply to fhe bundles only")
        if cast:
            from modelcloak.runtime.feeds import cast_feeds

            feeds = cast_feeds(feeds, session.manifest.get("model", {}).get("inputs", []))
        results = session.run(feeds)
    if output is not None:
        written = save_outputs(output, results)
        out.print(f"wrote {written} output(s) to {output}")
        return
    for line in output_lines(results):
        out.print(line, highlight=False, markup=False)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle to describe (no key needed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest as JSON.")] = False,
) -> None:
    """Show a bundle's manifest and what its scheme does and does not protect."""
    from modelcloak.bundle import Bundle, SignatureError
    from modelcloak.schemes import claims_for

    with Bundle.open(bundle) as sealed:
        manifest = sealed.manifest
        try:
            signer = sealed.verify_signature()
            signature = f"valid, by {signer}" if signer else "unsigned"
        except SignatureError as exc:
            signature = f"INVALID: {exc}"
    if as_json:
        out.print_json(json.dumps(manifest.document))
        return
    doc = manifest.document
    table = Table(show_header=False, box=None)
    table.add_row("bundle", str(bundle))
    table.add_row("format version", str(manifest.format_version))
    table.add_row("scheme", manifest.scheme)
    key = manifest.key
    kdf = key.get("kdf")
    kdf_text = (
        f", {kdf.get('name')} n={kdf.get('n')} r={kdf.get('r')} p={kdf.get('p')}" if isinstance(kdf, dict) else ""
    )
    table.add_row("key", f"id {manifest.key_id} ({key.get('provider')}{kdf_text})")
    table.add_row("signature", signature)
    if "serial" in doc:
        table.add_row("serial", str(doc["serial"]))
    created = doc.get("created", {})
    table.add_row(
        "created",
        f"{created.get('at', '?')} by {created.get('tool', '?')}"
        + (f" [{created['label']}]" if created.get("label") else ""),
    )
    for kind in ("inputs", "outputs"):
        for spec in doc.get("model", {}).get(kind, []):
            table.add_row(kind[:-1], f"{spec.get('name')} {spec.get('dtype')} {spec.get('shape')}")
    for entry in manifest.sections:
        table.add_row("section", f"{entry.name}: {entry.size:,} bytes encrypted")
    table.add_row("policy", json.dumps(doc.get("policy", {})))
    lock = doc.get("lock")
    if isinstance(lock, dict):
        devices = ", ".join(str(entry.get("device")) for entry in lock.get("devices", []) if isinstance(entry, dict))
        part = "public part" if lock.get("part") else "weights"
        table.add_row("lock", f"{part} locked with {lock.get('method')} to {devices}")
    fhe = doc.get("fhe")
    if isinstance(fhe, dict):
        table.add_row(
            "fhe",
            f"CKKS ({fhe.get('backend')}), {fhe.get('security')}-bit, activation {fhe.get('activation')}, "
            f"{'encrypted' if fhe.get('encrypt_weights') else 'encoded'} weights, model id {fhe.get('model_id')}",
        )
    out.print(table)
    claims = claims_for(manifest.scheme)
    if claims:
        out.print(f"\n[bold]{manifest.scheme}[/bold]: {claims.summary}")
        out.print("[green]protects against:[/green]")
        for line in claims.protects:
            out.print(f"  + {line}", highlight=False)
        out.print("[red]does not protect against:[/red]")
        for line in claims.does_not_protect:
            out.print(f"  - {line}", highlight=False)


@app.command()
def splits(model: Annotated[Path, typer.Argument(help="ONNX model file.")]) -> None:
    """List every candidate cut of MODEL with the private part's size, FLOPs and boundary size."""
    from modelcloak.model import load_model
    from modelcloak.model.cut import candidate_cuts, describe_cut_table

    rows = describe_cut_table(candidate_cuts(load_model(model)))
    if not rows:
        raise ModelcloakError(f"{model} has no valid cut (no node after which a weighted private part remains)")
    table = Table(title=f"candidate cuts of {model.name} (use --cut-index N with protect --scheme split)")
    for column in rows[0]:
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    out.print(table)


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ModelcloakError(f"{what} must be comma-separated integers, got {text!r}") from None


@app.command("bench-splits")
def bench_splits(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    cuts: Annotated[Optional[str], typer.Option(help="Comma-separated cut indices (default: all).")] = None,
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,64",
    repeats: Annotated[int, typer.Option(help="Timed calls per measurement (median).")] = 20,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads, both sides.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for splits.csv/json/png.")] = Path("bench-splits"),
) -> None:
    """Time every cut through the real enclave: public, private, boundary, start-up, total vs whole model."""
    from rich.progress import Progress

    from modelcloak.eval.splits import bench_splits as run_bench
    from modelcloak.eval.splits import write_report
    from modelcloak.model import load_model
    from modelcloak.model.cut import candidate_cuts

    chosen = _int_list(cuts, "--cuts")
    batch_sizes = _int_list(batches, "--batches") or [1]
    if repeats < 1 or any(b < 1 for b in batch_sizes):
        raise ModelcloakError("--repeats and --batches must be positive")
    total = len(chosen) if chosen is not None else len(candidate_cuts(load_model(model)))
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("cuts", total=total)
        # Called as each cut starts: name it and count it.
        rows = run_bench(
            model,
            cuts=chosen,
            batches=batch_sizes,
            repeats=repeats,
            threads=threads,
            on_step=lambda label: bar.update(task, description=label, advance=1),
        )
    paths = write_report(rows, out_dir, f"latency per cut: {model.name}")
    columns = ("cut", "batch", "whole_ms", "public_ms", "private_ms", "boundary_round_trip_ms", "total_ms",
               "total_vs_whole", "enclave_start_s")  # fmt: skip
    table = Table(title=f"bench-splits {model.name} (medians, ms)")
    for column in columns:
        table.add_column(column.replace("_ms", "").replace("_", " "))
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    out.print(table)
    out.print(f"wrote {paths['csv']}, {paths['json']} and {paths['png']}")


@app.command("bench-lock")
def bench_lock(
    repeats: Annotated[int, typer.Option(help="Alternating seal/lock loads per model (median).")] = 7,
    epochs: Annotated[int, typer.Option(help="Training epochs of the two MNIST models.")] = 3,
    soft: Annotated[bool, typer.Option(help="Include the soft lock (fine-tune + INT8/FP16 quantisation).")] = True,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for lock.md, CSVs and lock.png.")] = Path("bench-lock"),
) -> None:
    """Lock scheme on MNIST models and EfficientNet-Lite0: accuracy per device/key/format, KS, unlock overhead."""
    from modelcloak.eval.lockbench import bench_lock as run_bench
    from modelcloak.eval.lockbench import write_lock_report

    bench = run_bench(repeats=repeats, epochs=epochs, soft=soft, console=err)
    command = f"modelcloak bench-lock --repeats {repeats} --epochs {epochs}" + ("" if soft else " --no-soft")
    paths = write_lock_report(bench, out_dir, command=command)
    table = Table(title=f"bench-lock (devices: {bench.devices})")
    for column in ("model", "variant", "accuracy", "bit-identical", "note"):
        table.add_column(column, overflow="fold")
    for r in bench.accuracy:
        shown = "refused" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        identical = "" if r.identical is None else ("yes" if r.identical else "NO")
        table.add_row(r.model, r.variant, shown, identical, r.note)
    out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("enclave-manifest")
def enclave_manifest(
    output: Annotated[Path, typer.Option("--out", "-o", help="Where to write the Gramine manifest template.")] = Path(
        "modelcloak-enclave.manifest.template"
    ),
    threads: Annotated[int, typer.Option(help="onnxruntime threads inside the enclave.")] = 4,
    connect: Annotated[str, typer.Option(help="HOST:PORT the enclave dials to reach its host.")] = "127.0.0.1:7878",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a Gramine-SGX manifest template that runs this enclave entry point inside SGX."""
    import sys

    from modelcloak.enclave.gramine import render_manifest

    if output.exists() and not force:
        raise ModelcloakError(f"{output} already exists; pass --force to overwrite it")
    output.write_text(render_manifest(sys.executable, connect=connect, threads=threads))
    out.print(f"wrote {output}; build it with gramine-manifest and gramine-sgx-sign (docs/ENCLAVE.md)")


@app.command()
def doctor() -> None:
    """Show on-disk caches that could leak a model, and this machine's memory protections."""
    from modelcloak import hygiene
    from modelcloak.runtime import cacheguard

    findings = cacheguard.scan()
    out.print("[bold]inference caches[/bold] (what could write the model to disk, and what `run` does about it)")
    for finding in sorted(findings, key=lambda f: not f.risk):
        mark = "[red]writes[/red]" if finding.risk else "[green]safe[/green]  "
        out.print(f" {mark} [bold]{finding.setting}[/bold] ({finding.stack})", highlight=False)
        out.print(f"        now: {finding.found}", highlight=False, markup=False)
        out.print(f"        run: {finding.action}", highlight=False, markup=False)
    memory = Table(title="memory protections")
    memory.add_column("capability")
    memory.add_column("available")
    for name, value in hygiene.memory_capabilities().items():
        memory.add_row(name, str(value))
    out.print(memory)
    chosen = sum(f.risk and f.origin != "default" for f in findings)
    defaults = sum(f.risk and f.origin == "default" for f in findings)
    out.print(
        f"{defaults} cache(s) on by default: `modelcloak run` switches them off. "
        f"{chosen} cache(s) switched on here: `run` overrides them with a warning, `run --strict` refuses to start."
    )


@app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the key.")],
    signing: Annotated[
        bool, typer.Option("--signing", help="Make an Ed25519 signing key pair (PATH and PATH.pub).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key.")] = False,
) -> None:
    """Create a random 256-bit model key file (mode 0600), or an owner signing key pair."""
    if signing:
        from modelcloak.bundle.signing import fingerprint, generate_signing_key

        public = generate_signing_key(path, overwrite=force)
        out.print(f"wrote {path} and {path}.pub ({fingerprint(public)})")
        return
    from modelcloak.keys import generate_key_file

    generate_key_file(path, overwrite=force)
    out.print(f"wrote {path} (mode 600)")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's model, key and bundle.")] = Path(
        "modelcloak-demo"
    ),
    epochs: Annotated[int, typer.Option(help="Training epochs for the MNIST CNN.")] = 3,
) -> None:
    """Train a small CNN on real MNIST digits, seal it, and compare sealed and plain accuracy."""
    from modelcloak.zoo.demo import run_demo

    run_demo(workdir, out, epochs=epochs)


eval_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Measure what protection costs and what an attacker gets."
)
app.add_typer(eval_app, name="eval")

from modelcloak.cli import device_commands as _device_commands  # noqa: E402 - needs `app`

_device_commands.register(app)


def _task_data(task: str | None, data: Path | None) -> tuple[Any, Any, Any]:
    """(attacker pool, test inputs, test labels) from a shipped task or an .npz with pool_x/test_x/test_y."""
    import numpy as np

    if (task is None) == (data is None):
        raise ModelcloakError("give exactly one of --task mnist or --data FILE.npz (arrays pool_x, test_x, test_y)")
    if task is not None:
        if task != "mnist":
            raise ModelcloakError(f"unknown task {task!r}; shipped tasks: mnist")
        from modelcloak.zoo.mnist import load_mnist

        split = load_mnist()
        return split.x_train, split.x_test, split.y_test
    loaded = _load_inputs(data)
    if not isinstance(loaded, dict) or not {"pool_x", "test_x", "test_y"} <= set(loaded):
        raise ModelcloakError(f"{data} must be an .npz with arrays pool_x, test_x and test_y")
    return loaded["pool_x"], loaded["test_x"], np.asarray(loaded["test_y"])


@eval_app.command("accuracy")
def eval_accuracy(
    task: Annotated[str, typer.Option(help="mnist, text (MiniLM) or image (EfficientNet-Lite0).")] = "mnist",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for accuracy.md/csv/png.")] = Path("eval-accuracy"),
) -> None:
    """eNNclave's experiment: private head only ("fixed") vs everything fine-tuned ("flexible")."""
    from modelcloak.eval.accuracy import run_accuracy, write_accuracy_report

    results = run_accuracy(task, seed=seed, progress=True)
    paths = write_accuracy_report(results, out_dir)
    table = Table(title=f"accuracy, {task}")
    for column in ("mode", "accuracy", "public parameters", "private parameters", "train s"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.mode,
            f"{r.accuracy:.4f}",
            f"{r.public_parameters:,}",
            f"{r.private_parameters:,}",
            f"{r.train_seconds:.1f}",
        )
    out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@eval_app.command("extraction")
def eval_extraction(
    bundle: Annotated[Optional[Path], typer.Argument(help="Split bundle to attack (omit with --report).")] = None,
    key_file: KeyFileOpt = None,
    enclave_key_file: Annotated[Optional[Path], typer.Option("--enclave-key-file", help="The enclave's key.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Shipped task providing attacker data: mnist.")] = None,
    data: Annotated[Optional[Path], typer.Option(help=".npz with pool_x, test_x, test_y.")] = None,
    budgets: Annotated[str, typer.Option(help="Comma-separated query budgets.")] = "0,50,500,5000",
    report: Annotated[
        bool, typer.Option("--report", help="Full MNIST report: train, split per cut and policy.")
    ] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for extraction.md/csv/png.")] = Path("eval-extraction"),
) -> None:
    """Attack a split bundle as the device operator could: knockoff (labels) and algebraic (scores)."""
    from modelcloak.eval import extraction

    budget_list = _int_list(budgets, "--budgets") or [0]
    if report:
        if bundle is not None:
            raise ModelcloakError("--report builds its own bundles; do not pass BUNDLE")
        rows = extraction.mnist_report(out_dir, budgets=budget_list, progress=True)
    else:
        from modelcloak.bundle import Bundle
        from modelcloak.keys import KeyFile

        if bundle is None or key_file is None or enclave_key_file is None:
            raise ModelcloakError(
                "attacking a bundle needs BUNDLE, --key-file and --enclave-key-file (or use --report)"
            )
        pool_x, test_x, test_y = _task_data(task, data)
        with Bundle.open(bundle) as sealed:
            if sealed.manifest.scheme != "split":
                raise ModelcloakError(f"{bundle} is a {sealed.manifest.scheme!r} bundle; extraction attacks need split")
        rows = extraction.attack_bundle(
            bundle,
            host_key=KeyFile(key_file),
            enclave_key_file=enclave_key_file,
            pool_x=pool_x,
            test_x=test_x,
            test_y=test_y,
            budgets=budget_list,
            cut_index=-1,
        )
    table = Table(title="extraction")
    for column in ("cut", "policy", "attack", "budget", "answered", "accuracy", "fidelity"):
        table.add_column(column)
    for r in rows:
        shown = (f"{r.accuracy:.3f}", f"{r.fidelity:.3f}") if r.applicable else ("n/a", "n/a")
        table.add_row(str(r.cut_name or r.cut), r.policy, r.attack, str(r.budget), str(r.queries_answered), *shown)
    out.print(table)
    if report:
        out.print(f"wrote {out_dir / 'extraction.md'}, {out_dir / 'extraction.csv'} and {out_dir / 'extraction.png'}")
    else:
        paths = extraction.write_report(rows, out_dir, title=f"extraction attacks on {bundle.name}")
        out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
def recommend(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    task: Annotated[Optional[str], typer.Option(help="Shipped task providing attacker data: mnist.")] = None,
    data: Annotated[Optional[Path], typer.Option(help=".npz with pool_x, test_x, test_y.")] = None,
    max_fidelity: Annotated[float, typer.Option(help="Highest attacker fidelity you accept.")] = 0.5,
    attack_budget: Annotated[int, typer.Option(help="Queries the attacker may make.")] = 500,
    max_latency: Annotated[float, typer.Option(help="Highest split/whole latency ratio you accept.")] = 1.5,
    enclave_memory_mb: Annotated[float, typer.Option(help="Enclave memory budget for private weights.")] = 64.0,
    cuts: Annotated[Optional[str], typer.Option(help="Comma-separated cut indices (default: all).")] = None,
) -> None:
    """Where to stop: the cheapest cut meeting your fidelity, latency and memory targets, with the evidence."""
    from rich.progress import Progress

    from modelcloak.eval.recommend import Targets
    from modelcloak.eval.recommend import recommend as do_recommend

    pool_x, test_x, test_y = _task_data(task, data)
    targets = Targets(
        max_fidelity=max_fidelity,
        attack_budget=attack_budget,
        max_latency_ratio=max_latency,
        enclave_memory_bytes=int(enclave_memory_mb * 1024 * 1024),
    )
    with Progress(console=err, transient=True) as bar:
        task_id = bar.add_task("measuring", total=None)
        result = do_recommend(
            model,
            pool_x=pool_x,
            test_x=test_x,
            test_y=test_y,
            targets=targets,
            cuts=_int_list(cuts, "--cuts"),
            on_step=lambda label: bar.update(task_id, description=label),
        )
    table = Table(title=f"cuts of {model.name}")
    for column in ("cut", "after", "private params", "latency x", "attacker fidelity", "meets", "why not"):
        table.add_column(column, overflow="fold")
    for a in result.cuts:
        table.add_row(
            str(a.cut),
            a.after_node,
            f"{a.private_parameters:,}",
            f"{a.latency_ratio:.2f}",
            f"{a.attacker_fidelity:.2f}",
            "yes" if a.meets else "no",
            "; ".join(a.reasons),
        )
    out.print(table)
    if result.chosen:
        out.print(
            f"recommended: cut {result.chosen.cut} (after {result.chosen.after_node}): --cut-index {result.chosen.cut}"
        )
    else:
        out.print("no cut meets every target.")
        for idea in result.suggestions:
            out.print(f"  - {idea}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit code 2, tracebacks only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MODELCLOAK_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="modelcloak", standalone_mode=False)
    except Abort:
        err.print("modelcloak: aborted", highlight=False)
        sys.exit(130)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `modelcloak`: show help, not an error
            out.print(
                command.get_help(command.make_context("modelcloak", ["--help"], resilient_parsing=True)),
                highlight=False,
            )
            return
        if debug:
            raise
        err.print(f"modelcloak: error: {exc.format_message()} (see modelcloak --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModelcloakError as exc:
        if debug:
            raise
        err.print(f"modelcloak: error: {exc}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # last resort: still one line, with the way to see more
        if debug:
            raise
        err.print(
            f"modelcloak: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        sys.exit(1)


from modelcloak.cli import owner_commands as _owner_commands  # noqa: E402

_owner_commands.register(app)

from modelcloak.cli import fhe_commands as _fhe_commands  # noqa: E402

_fhe_commands.register(app)
