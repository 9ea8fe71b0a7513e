"""`protect`, `run`, `inspect`, `keygen`, `doctor` and `demo`: the bundle's life from owner to device."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import (
    KeyEnvOpt,
    KeyFileOpt,
    PassEnvOpt,
    PassPromptOpt,
    err,
    key_provider,
    load_inputs,
    out,
)
from modelcloak.errors import ModelcloakError


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
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing bundle.")] = False,
    serial: Annotated[
        Optional[int], typer.Option("--serial", min=0, help="Release number devices can require (--min-serial).")
    ] = None,
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
        Optional[int], typer.Option("--query-budget", help="split: samples the enclave may answer, in all.")
    ] = None,
    budget_counter: Annotated[
        Optional[str],
        typer.Option(
            "--budget-counter",
            help="split: where the budget's count lives: sealed (default; survives restarts), tpm "
            "(also refuses an old state file) or session (per enclave process).",
        ),
    ] = None,
    rate_limit: Annotated[Optional[float], typer.Option("--rate-limit", help="split: samples per second.")] = None,
    lock_to: Annotated[
        Optional[list[Path]],
        typer.Option("--lock-to", help="lock, split: a device's exported lock key file (repeat for more devices)."),
    ] = None,
    lock_method: Annotated[
        str,
        typer.Option(
            "--lock-method",
            help="sealed (default: no extra size or time; a wrong key is refused), uniform-shift (a wrong key "
            "decodes to plausible weights; 2x size), or plain-aes/permutation to compare.",
        ),
    ] = "sealed",
    fhe_secret_out: Annotated[
        Optional[Path], typer.Option("--fhe-secret-out", help="fhe: where the owner's CKKS secret goes (0600).")
    ] = None,
    fhe_activation: Annotated[
        Optional[str],
        typer.Option(
            "--fhe-activation",
            help="fhe: square (default), modified-square, relu-poly (default with --fhe-train) or none.",
        ),
    ] = None,
    fhe_security: Annotated[int, typer.Option("--fhe-security", help="fhe: 128, 192 or 256 bits.")] = 128,
    fhe_calibration: Annotated[
        Optional[Path], typer.Option("--fhe-calibration", help="fhe relu-poly: .npy of model inputs for the range.")
    ] = None,
    fhe_plain_weights: Annotated[
        bool, typer.Option("--fhe-plain-weights", help="fhe: encode the weights instead of encrypting them.")
    ] = False,
    fhe_scale_bits: Annotated[
        Optional[int], typer.Option("--fhe-scale-bits", help="fhe: fix the CKKS scale (bits) instead of measuring.")
    ] = None,
    fhe_poly_degree: Annotated[
        Optional[int], typer.Option("--fhe-poly-degree", help="fhe: fix the ring degree (4096..32768).")
    ] = None,
    fhe_head: Annotated[
        Optional[Path], typer.Option("--fhe-head", help="fhe: a fine-tuned head from `fhe-finetune` (HEAD.npz).")
    ] = None,
    fhe_train: Annotated[
        Optional[Path],
        typer.Option("--fhe-train", help="fhe: .npz with x (model inputs) and y (labels): fine-tune the head here."),
    ] = None,
    fhe_epochs: Annotated[int, typer.Option("--fhe-epochs", help="fhe: fine-tuning epochs with --fhe-train.")] = 6,
) -> None:
    """Protect MODEL into an encrypted, optionally signed bundle (seal; split with --cut-*; lock with --lock-to)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from modelcloak.protector import protect as do_protect

    if output.exists() and not force:
        raise ModelcloakError(f"{output} already exists; pass --force to overwrite it")
    if output.resolve() == model.resolve():
        raise ModelcloakError("the bundle path must differ from the model path")
    provider = key_provider(key_file, key_env, passphrase_env, passphrase)
    options = _protect_options(
        scheme,
        cut=_cut_selector(cut_after, cut_tensors, cut_last, cut_index),
        enclave_key_file=enclave_key_file,
        policy={
            "output": output_policy,
            "query_budget": query_budget,
            "rate_limit_per_s": rate_limit,
            "budget_counter": budget_counter,
        },
        lock_to=lock_to,
        lock_method=lock_method,
        fhe={
            "secret_out": fhe_secret_out,
            "activation": fhe_activation,
            "security": fhe_security,
            "encrypt_weights": not fhe_plain_weights,
            "calibration": load_inputs(fhe_calibration) if fhe_calibration is not None else None,
            "scale_bits": fhe_scale_bits,
            "poly_degree": fhe_poly_degree,
            "head": fhe_head,
            **_fhe_training(fhe_train),
            "finetune_epochs": fhe_epochs,
        },
    )
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
            progress=lambda n: bar.advance(task, n),
            serial=serial,
            **options,
        )
    signed = "signed" if manifest.signer_public_key else "unsigned"
    size = output.stat().st_size
    out.print(f"wrote {output} ({size:,} bytes, scheme {manifest.scheme}, key id {manifest.key_id}, {signed})")


def _fhe_training(path: Path | None) -> dict[str, Any]:
    """`--fhe-train DATA.npz`: the model inputs `x` and class labels `y` that `protect` fine-tunes on."""
    if path is None:
        return {}
    arrays = load_inputs(path)
    if not isinstance(arrays, dict) or "x" not in arrays or "y" not in arrays:
        raise ModelcloakError(f"{path}: --fhe-train expects an .npz with arrays x (model inputs) and y (labels)")
    return {"train_inputs": arrays["x"], "train_labels": arrays["y"]}


def _cut_selector(after: str | None, tensors: str | None, last: int | None, index: int | None) -> Any:
    from modelcloak.options import CutSelector

    given: dict[str, Any] = {
        "after_node": after,
        "tensors": tuple(t for t in tensors.split(",") if t) if tensors else None,
        "last": last,
        "index": index,
    }
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ModelcloakError("give exactly one of --cut-after, --cut-tensors, --cut-last, --cut-index")
    return CutSelector(**given)


def _protect_options(
    scheme: str,
    *,
    cut: Any,
    enclave_key_file: Path | None,
    policy: dict[str, Any],
    lock_to: list[Path] | None,
    lock_method: str,
    fhe: dict[str, Any],
) -> dict[str, Any]:
    """protect()'s scheme options from the flags: only what was given, so the scheme can refuse the rest."""
    from modelcloak.keys import KeyFile
    from modelcloak.options import FheOptions, LockOptions

    options: dict[str, Any] = {}
    if cut is not None:
        options["cut"] = cut
    if enclave_key_file is not None:
        options["enclave_key"] = KeyFile(enclave_key_file)
    if scheme == "split":
        options["policy"] = policy
    if lock_to:
        from modelcloak.keys.device import DeviceLockKey

        options["lock"] = LockOptions(tuple(DeviceLockKey.from_file(path) for path in lock_to), lock_method)
    if scheme == "fhe":
        if fhe["secret_out"] is None:
            raise ModelcloakError("scheme fhe needs --fhe-secret-out FILE for the owner's secret key")
        options["fhe"] = FheOptions(**fhe)
    return options


def _native_enclave_command(
    native_enclave: Path | None, enclave_key_file: Path | None, enclave_key_env: str | None
) -> tuple[str, ...] | None:
    """`run --native-enclave`: the enclave-build binary (a build directory names the one inside it)."""
    if native_enclave is None:
        return None
    if enclave_key_file is None and enclave_key_env is None:
        raise ModelcloakError("--native-enclave needs the enclave's key: give --enclave-key-file or --enclave-key-env")
    from modelcloak.native.build import BINARY_NAME

    binary = native_enclave / BINARY_NAME if native_enclave.is_dir() else native_enclave
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ModelcloakError(f"--native-enclave: {binary} is not an executable native enclave (see enclave-build)")
    return (str(binary.resolve()),)


def _scheme_of(bundle: Path) -> str:
    from modelcloak.bundle import Bundle

    with Bundle.open(bundle) as sealed:
        return sealed.manifest.scheme


def _owner_key(
    url: str,
    licence: str | None,
    device_id: str | None,
    instance_id: str | None,
    attest: str,
    sim_key: Path | None,
    measurements: list[str] | None,
    tcti: str | None,
    pin: str | None = None,
) -> Any:
    """The owner backend as key source, with the device's evidence (TPM quote, or INSECURE sim)."""
    from modelcloak.licensing.client import OwnerBackendKey

    if not licence or not device_id:
        raise ModelcloakError("--owner-url needs --licence and --device-id")
    if pin is not None:
        from modelcloak.licensing.pinning import parse_pin

        pin = parse_pin(pin)  # a malformed pin is named before any attester is opened
    if attest == "tpm":
        from modelcloak.keys.tpm_attest import TpmAttester

        attester: Any = TpmAttester(tcti=tcti)
    elif attest == "sim":
        from modelcloak.licensing.client import SimAttester
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
        url, licence_id=licence, device_id=device_id, attester=attester, instance_id=instance_id or device_id, pin=pin
    )


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
        typer.Option(
            "--trusted-signer", help="Owner public key (PEM, repeatable): only bundles it signed are run. Required."
        ),
    ] = None,
    allow_unsigned: Annotated[
        bool,
        typer.Option(
            "--allow-unsigned",
            help="Development only: run without a pinned owner key (any bundle the key opens, whoever built it).",
        ),
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse to run when any on-disk cache is enabled.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads for onnxruntime.")] = None,
    min_serial: Annotated[
        Optional[int],
        typer.Option("--min-serial", min=0, help="Refuse bundles older than this serial (needs --trusted-signer)."),
    ] = None,
    cast: Annotated[
        bool, typer.Option("--cast", help="Convert inputs to the model's types (never wraps integers).")
    ] = False,
    enclave_key_file: Annotated[
        Optional[Path], typer.Option("--enclave-key-file", help="split bundles: the enclave's key file.")
    ] = None,
    enclave_key_env: Annotated[
        Optional[str], typer.Option("--enclave-key-env", help="split bundles: variable holding the enclave key.")
    ] = None,
    native_enclave: Annotated[
        Optional[Path],
        typer.Option(
            "--native-enclave", help="split bundles: run this enclave-build binary (or directory) as the enclave."
        ),
    ] = None,
    budget_state: Annotated[
        Optional[Path],
        typer.Option(
            "--budget-state",
            help="split bundles with a query budget: file keeping its sealed count "
            "(default: $XDG_STATE_HOME/modelcloak/budgets/).",
        ),
    ] = None,
    enclave_tpm: Annotated[
        Optional[str],
        typer.Option("--enclave-tpm", help="split bundles with a tpm budget: the TPM's TCTI (default /dev/tpmrm0)."),
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
    fhe_labels: Annotated[
        Optional[Path],
        typer.Option("--fhe-labels", help="fhe bundles with --owner-url: get the labels from the owner, write JSON."),
    ] = None,
    owner_url: Annotated[
        Optional[str], typer.Option("--owner-url", help="Get the key from the owner backend (attested release).")
    ] = None,
    owner_pin: Annotated[
        Optional[str],
        typer.Option("--owner-pin", help="owner backend: refuse any TLS certificate key but sha256:<hex> (SPKI)."),
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
    from modelcloak.inference import load
    from modelcloak.options import LoadOptions, Metering
    from modelcloak.runtime import FheSession

    _check_signer_pinning(trusted_signer, allow_unsigned)
    feeds: Any = load_inputs(inputs)  # a dict of arrays or one array; cast_feeds keeps the form
    if output is not None:
        check_output_path(output)
    owner_key = None
    if owner_url is not None:
        if key_file or key_env or passphrase_env or passphrase:
            raise ModelcloakError("--owner-url is the key source: do not also give --key-file/--key-env/--passphrase")
        owner_key = _owner_key(
            owner_url, licence, device_id, instance_id, attest, sim_key, measurement, tcti, pin=owner_pin
        )
        provider = owner_key
    else:
        if owner_pin is not None:
            raise ModelcloakError("--owner-pin pins the owner backend's certificate: give --owner-url too")
        provider = key_provider(key_file, key_env, passphrase_env, passphrase)
    device_key = None
    if device_state is not None:
        from modelcloak.keys.enrolled import open_device_key

        device_key = open_device_key(device_state, tcti=tcti)
    if owner_key is not None and usage_state is None:
        raise ModelcloakError("--owner-url needs --usage-state FILE to keep usage counts across restarts")
    if (fhe_result is not None or encrypt_features or fhe_labels is not None) and _scheme_of(bundle) != "fhe":
        raise ModelcloakError("--fhe-result, --fhe-labels and --encrypt-features apply to fhe bundles only")
    if fhe_labels is not None and owner_key is None:
        raise ModelcloakError("--fhe-labels asks the owner backend: give --owner-url (and its options)")
    options = LoadOptions.from_keywords(
        backend=backend,
        trusted_signers=tuple(trusted_signer or ()),
        threads=threads,
        min_serial=min_serial,
        cache_policy="strict" if strict else "override",
        enclave_key_file=enclave_key_file,
        enclave_key_env=enclave_key_env,
        enclave_command=_native_enclave_command(native_enclave, enclave_key_file, enclave_key_env),
        enclave_budget_state=budget_state,
        enclave_tpm=enclave_tpm,
        device_key=device_key,
        metering=Metering(usage_state) if owner_key is not None and usage_state is not None else None,
    )
    with load(bundle, key=provider, options=options) as session:
        if isinstance(session, FheSession):
            if fhe_result is None and fhe_labels is None:
                raise ModelcloakError("this is an fhe bundle: its result is encrypted; give --fhe-result FILE")
            data = session.evaluate(feeds, encrypt_features=encrypt_features)
            if fhe_result is not None:
                fhe_result.write_bytes(data)
                out.print(f"wrote the encrypted result ({len(data):,} bytes) to {fhe_result}; the owner decrypts it")
            if fhe_labels is not None:
                from modelcloak.licensing.fhe_labels import labels_from_owner

                assert usage_state is not None  # checked with --owner-url above
                labels = labels_from_owner(owner_key, data, usage_state=usage_state, out=fhe_labels)
                out.print(f"labels from the owner: {labels}; written to {fhe_labels}", highlight=False)
            return
        if cast:
            from modelcloak.runtime.feeds import cast_feeds

            feeds = cast_feeds(feeds, session.input_specs)
        results = session.run(feeds)
    if output is not None:
        written = save_outputs(output, results)
        out.print(f"wrote {written} output(s) to {output}")
        return
    for line in output_lines(results):
        out.print(line, highlight=False, markup=False)


def _check_signer_pinning(trusted_signer: list[Path] | None, allow_unsigned: bool) -> None:
    """`run` pins the owner's signing key by default; running unpinned must be asked for by name."""
    if trusted_signer and allow_unsigned:
        raise ModelcloakError("--allow-unsigned and --trusted-signer contradict each other: give one")
    if not trusted_signer and not allow_unsigned:
        raise ModelcloakError(
            "give the owner's public key with --trusted-signer OWNER.pem.pub, so that only bundles the owner "
            "signed are run (a re-signed, altered or older bundle is refused); --allow-unsigned runs "
            "without that check (development only)"
        )


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle to describe (no key needed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest as JSON.")] = False,
) -> None:
    """Show a bundle's manifest and what its scheme does and does not protect."""
    from modelcloak.bundle import Bundle, SignatureError
    from modelcloak.bundle.manifest import SIGNATURE_DIGESTS
    from modelcloak.schemes import SCHEMES, claims_for
    from modelcloak.schemes import get as get_scheme

    with Bundle.open(bundle) as sealed:
        manifest = sealed.manifest
        try:
            signer = sealed.verify_signature()
            digest = SIGNATURE_DIGESTS.get(manifest.format_version, "?")
            signature = f"valid, by {signer} (Ed25519 over {digest} digests)" if signer else "unsigned"
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
    if "serial" in doc:
        table.add_row("serial", str(doc["serial"]))
    if doc.get("policy"):
        table.add_row("policy", json.dumps(doc.get("policy", {})))
    if manifest.scheme in SCHEMES:
        for label, text in get_scheme(manifest.scheme).describe(doc):
            table.add_row(label, text)
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


def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("modelcloak-demo"),
    only: Annotated[
        Optional[list[str]],
        typer.Option("--only", help="Only this step: seal, lock, split, fhe, summary (repeat)."),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller settings (CI): 2 epochs, 300 test digits.")] = False,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs for the MNIST CNN.")] = None,
    attack_budget: Annotated[
        Optional[int], typer.Option("--attack-budget", help="split: the attacker's label-only queries.")
    ] = None,
) -> None:
    """The whole product on real MNIST digits: seal, lock, split (with an attack), fhe + owner backend, summary."""
    import dataclasses

    from modelcloak.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if quick else DemoSettings()
    chosen = {"epochs": epochs, "attack_budget": attack_budget}
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    run_demo(workdir, out, settings, only=only)


def register(app: typer.Typer) -> None:
    """Add the bundle commands to the main app."""
    for command in (protect, run, inspect, doctor, keygen, demo):
        app.command()(command)
