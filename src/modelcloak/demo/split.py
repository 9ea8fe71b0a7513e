"""Step 3, split: the private layers run in the enclave process, which answers labels only, within a budget.

`modelcloak.eval.recommend` measures the latest candidate cuts (latency through the real enclave,
and a real label-only attack at the demo's query budget) against its default targets. When no cut
meets them, which is the honest outcome for a model this small (the public layers do most of
the work), the demo takes the cut where the attacker did worst and says so. Then the owner
protects at that cut with a label-only policy and a query budget, the device runs it, and the
real attack (`modelcloak.eval.extraction`) runs against that bundle beside the black-box
baseline: a model trained from scratch on the same number of labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelcloak.demo.context import INPUT_NAME, SEED, DemoContext, DemoError, Row, StepResult, median_seconds


def _recommended_cut(ctx: DemoContext, model_path) -> tuple[int, Any]:  # noqa: ANN001 - a Path
    """Run `recommend` on the latest candidate cuts; the chosen cut, or the one the attacker did worst on."""
    import onnx

    from modelcloak.eval.recommend import Targets, recommend
    from modelcloak.eval.sweep import attacker_data
    from modelcloak.model.cut import candidate_cuts

    proto = onnx.load(model_path)
    candidates = candidate_cuts(proto)
    # One cut per distinct private part, the one with the smallest boundary (less to send per query);
    # the latest ones: cutting earlier costs enclave time that a two-core demo cannot spend.
    best: dict[int, int] = {}
    for index, cut in enumerate(candidates):
        chosen = best.get(cut.private_parameters)
        if chosen is None or cut.boundary_bytes < candidates[chosen].boundary_bytes:
            best[cut.private_parameters] = index
    cuts = sorted(best.values())[-ctx.settings.recommend_cuts :]
    targets = Targets(attack_budget=ctx.settings.attack_budget)
    plain = ctx.model()
    with ctx.console.status("    recommend: timing each cut and attacking it ...") as status:
        data = attacker_data(
            plain.x_pool,
            plain.x_test,
            plain.y_test,
            source="digits the victim was not trained on",
        )
        recommendation = recommend(
            proto,
            data,
            targets=targets,
            cuts=cuts,
            seeds=(SEED,),
            rounds=max(3, ctx.settings.latency_repeats // 3),
            on_step=lambda text: status.update(f"    recommend: {text}"),
        )
    for advice in recommendation.cuts:
        verdict = "meets the targets" if advice.meets else "; ".join(advice.reasons)
        ctx.console.print(
            f"      cut {advice.cut} after {advice.after_node}: {advice.private_parameters:,} private weights, "
            f"latency {advice.latency_ratio:.1f}x, attacker fidelity {advice.attacker_fidelity:.2f} ({verdict})"
        )
    if recommendation.chosen is not None:
        ctx.console.print(f"    recommended: cut {recommendation.chosen.cut}")
        return recommendation.chosen.cut, recommendation
    fallback = min(recommendation.cuts, key=lambda a: (a.attacker_fidelity, a.latency_ratio))
    ctx.console.print(
        f"    no cut meets fidelity <= {targets.max_fidelity} and latency <= {targets.max_latency_ratio}x; "
        f"the demo takes cut {fallback.cut}, where the attacker did worst. recommend suggests:"
    )
    for idea in recommendation.suggestions:
        ctx.console.print(f"      - {idea}")
    return fallback.cut, recommendation


def _host_can_open_private(bundle, key) -> bool:  # noqa: ANN001
    """Try to decrypt the private section with the host's key, as a device root would."""
    from modelcloak.bundle import Bundle
    from modelcloak.errors import ModelcloakError

    with Bundle.open(bundle) as sealed:
        entry = sealed.manifest.section("private")
        master = key.key_for(sealed.manifest.key)
        try:
            sealed.decrypt_section_into("private", master.view(), memoryview(bytearray(entry.size)))
        except ModelcloakError:
            return False
        finally:
            master.close()
    return True


def run(ctx: DemoContext) -> StepResult:
    import onnxruntime as ort

    import modelcloak
    from modelcloak.eval.extraction import attack_bundle, black_box_reference
    from modelcloak.keys import KeyFile, generate_key_file
    from modelcloak.runtime.session import SplitSession

    settings = ctx.settings
    plain = ctx.model()
    key_path, enclave_key_path = ctx.path("model.key"), ctx.path("enclave.key")
    if not key_path.is_file():
        generate_key_file(key_path)
    key = KeyFile(key_path)
    enclave_key = generate_key_file(enclave_key_path, overwrite=True)
    cut, recommendation = _recommended_cut(ctx, plain.path)

    bundle = ctx.path("split.mcb")
    policy = modelcloak.OutputPolicy(output="label", query_budget=settings.query_budget)
    ctx.console.print(f"    owner: protect --scheme split at cut {cut}, label-only, {settings.query_budget:,} queries")
    modelcloak.protect(
        plain.path, bundle, key=key, scheme="split", cut=modelcloak.CutSelector(index=cut),
        enclave_key=enclave_key, policy=policy,
    )  # fmt: skip

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    reference = ort.InferenceSession(str(plain.path), options, providers=["CPUExecutionProvider"])
    one = {INPUT_NAME: plain.x_test[:1]}
    with modelcloak.load(bundle, key=key, enclave_key_file=enclave_key_path, threads=settings.threads) as session:
        if not isinstance(session, SplitSession):
            raise DemoError(f"{bundle} opened as a {type(session).__name__}, not a split session")
        (answer,) = session.run({INPUT_NAME: plain.x_test}).values()  # "label" under the label policy
        boundary = session.boundary({INPUT_NAME: plain.x_test[:1]})
        plain_latency, split_latency = median_seconds(
            lambda: reference.run(None, one), lambda: session.run(one), repeats=settings.latency_repeats
        )
    labels = np.asarray(answer).reshape(-1)
    labels_only = np.issubdtype(np.asarray(answer).dtype, np.integer) and labels.size == len(plain.x_test)
    equal = int(np.sum(labels == plain.labels))
    accuracy = float(np.mean(labels == plain.y_test))
    host_opens_private = _host_can_open_private(bundle, key)
    shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in boundary.items())
    ctx.console.print(
        f"      device: labels equal to plain on {equal}/{len(labels)} digits; the host saw the boundary "
        f"({shapes}) and {np.asarray(answer).dtype} labels, no scores; the host key opens the private "
        f"section: {'yes' if host_opens_private else 'no'}"
    )

    budget = settings.attack_budget
    with ctx.console.status(f"    attacker: {budget} label-only queries through the enclave ...") as status:
        attacked = attack_bundle(
            bundle,
            host_key=key,
            enclave_key_file=enclave_key_path,
            pool_x=plain.x_pool,
            test_x=plain.x_test,
            test_y=plain.y_test,
            budgets=[budget],
            cut_index=cut,
            seed=SEED,
            victim_outputs=plain.labels,
            on_step=lambda text: status.update(f"    attacker: {text}"),
        )
        status.update(f"    black-box baseline: a CNN trained from scratch on {budget} labels ...")
        black_box = black_box_reference(
            lambda x: reference.run(None, {INPUT_NAME: x})[0], plain.x_pool, plain.x_test, plain.y_test, [budget],
            seed=SEED,
        )[0]  # fmt: skip
    knockoff = next(r for r in attacked if r.attack == "knockoff")
    ctx.console.print(
        f"      attacker with the public layers: accuracy {knockoff.accuracy:.1%}, fidelity {knockoff.fidelity:.1%} "
        f"({knockoff.queries_answered} answers); black-box baseline: accuracy {black_box.accuracy:.1%}, "
        f"fidelity {black_box.fidelity:.1%}"
    )
    return StepResult(
        step="split",
        rows=[
            Row(
                f"split (cut {cut}, labels)",
                accuracy,
                split_latency / plain_latency,
                f"public layers + {budget} labels: a copy at {knockoff.accuracy:.0%} "
                f"(black-box: {black_box.accuracy:.0%})",
                "the model key, the enclave key (enclave only) and budgeted queries",
                thief_accuracy=knockoff.accuracy,
            )
        ],
        facts={
            "cut": cut,
            "recommended": recommendation.chosen is not None,
            "recommend": [a.to_row() for a in recommendation.cuts],
            "suggestions": recommendation.suggestions,
            "labels_equal": equal == len(labels),
            "labels_only": bool(labels_only),
            "host_opens_private_section": host_opens_private,
            "split_accuracy": accuracy,
            "attack_budget": budget,
            "attack_answers": knockoff.queries_answered,
            "attacker_accuracy": knockoff.accuracy,
            "attacker_fidelity": knockoff.fidelity,
            "black_box_accuracy": black_box.accuracy,
            "black_box_fidelity": black_box.fidelity,
            "plain_latency_ms": plain_latency * 1e3,
            "split_latency_ms": split_latency * 1e3,
        },
        files={"enclave key (enclave only)": ctx.shown(enclave_key_path), "split bundle": ctx.shown(bundle)},
        commands=[
            f"modelcloak recommend {ctx.shown(plain.path)} --task mnist --attack-budget {budget}",
            f"modelcloak keygen {ctx.shown(enclave_key_path)} --force",
            f"modelcloak protect {ctx.shown(plain.path)} -o {ctx.shown(bundle)} --scheme split --cut-index {cut} "
            f"--key-file {ctx.shown(key_path)} --enclave-key-file {ctx.shown(enclave_key_path)} "
            f"--output-policy label --query-budget {settings.query_budget} --force",
            f"modelcloak run {ctx.shown(bundle)} {ctx.shown(ctx.digits())} --key-file {ctx.shown(key_path)} "
            f"--enclave-key-file {ctx.shown(enclave_key_path)} --allow-unsigned -o outputs.npz",
            f"modelcloak eval extraction {ctx.shown(bundle)} --key-file {ctx.shown(key_path)} "
            f"--enclave-key-file {ctx.shown(enclave_key_path)} --task mnist",
        ],
    )
