r"""python benchmarks/bench_runtimes.py --wait_load=0.6

Install its extras first, in a venv of their own (never mlcrl_tf dependencies):
    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install -e ".[cpu]" \
        -r benchmarks/runtimes_requirements.txt

Against what a user would run instead (issue 21), on this CPU. Serving (C = 80, random
weights and BatchNorm statistics): the export's `serve_tensor` with oneDNN off (`tf`), on
(`tf onednn`) and on with TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1 (`tf onednn frozen`),
`--variants`, ONNX Runtime on the tf2onnx conversion, OpenVINO on its own (both cut at
`logits`; bf16 where the CPU has it), PyTorch eager on torchvision's ResNet (v1 strides,
Keras' weights, the crl head), NCHW and channels_last.
Training: the CLI's crl step (`Trainer.train_step`), oneDNN off and on, against PyTorch's
(same weights, head, f_im, f_l, loss, SGD), float32 and bfloat16. Correctness first: logits
against the export's (max |Δ|), the first two losses against the CLI's. Each TF setting and
runtime is a subprocess (`--worker`: TF reads TF_ENABLE_ONEDNN_OPTS at import), timed in
interleaved rounds (the first of each round rotating): medians and paired ratios (median of
the per-round ratios). The physical limit: FLOPs counted from the Keras graph (2 x the
multiply-adds of each Conv2D and Dense; a training step 3 x the forward) against the
practical peak, the fastest 4096^2 float32 matmul of NumPy, TF (Eigen, oneDNN) and PyTorch in
this run. A runtime that cannot load is reported ("could not load X: reason") and left out.
The tables replace this script's blocks in docs/performance.md (`--doc=` prints only).
"""

import contextlib
import datetime
import importlib
from importlib import metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from runtimes_torch import torch_logits  # noqa: E402  (this script's folder)
from runtimes_torch import torch_model  # noqa: E402
from runtimes_torch import torch_objective  # noqa: E402
import tensorflow as tf  # noqa: E402

from mlcrl_tf.modeling.model import build_model  # noqa: E402
from mlcrl_tf.run_dir import config as config_lib  # noqa: E402
from mlcrl_tf.serving import export_lib  # noqa: E402
from mlcrl_tf.training import trainer as trainer_lib  # noqa: E402

flags.DEFINE_list("serve_cases", ["resnet101:448", "resnet50:224"], "backbone:image_size.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Serving batch sizes.")
flags.DEFINE_list("train_cases", ["resnet50:224:8"], "backbone:image_size:batch_size.")
flags.DEFINE_list("parts", ["serve", "train", "bf16"], "serve, train (float32), bf16.")
flags.DEFINE_list("engines", ["tf", "tf_onednn", "tf_onednn_frozen", "onnxruntime", "openvino",
                              "torch"],
                  "Serving engines (tf_onednn_frozen: oneDNN with TF_ONEDNN_ASSUME_FROZEN_"
                  "WEIGHTS=1, serving only); training takes tf, tf_onednn and torch of them.")
flags.DEFINE_list("variants", [], "name=dir ({dir}: the case's) of more SavedModels to time.")
flags.DEFINE_integer("num_classes", 80, "C (COCO: 80).")
flags.DEFINE_integer("runs", 6, "Timed interleaved rounds (serving, float32 training).")
flags.DEFINE_integer("warmup", 2, "Untimed rounds first (training: the 2 checked steps).")
flags.DEFINE_integer("bf16_runs", 2, "Timed bfloat16 training rounds, after the 2 checked.")
flags.DEFINE_string("work_dir", "/tmp/bench_runtimes", "Exports, conversions, logs (reused).")
flags.DEFINE_string("doc", os.path.join(REPO, "docs", "performance.md"),
                    "Markdown file whose bench_runtimes.py blocks get the tables; '': none.")
flags.DEFINE_float("wait_load", 0.0, "First wait for a 1-minute load average below this.")
flags.DEFINE_integer("wait_minutes", 180, "The longest wait for --wait_load.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the inputs.")
flags.DEFINE_string("worker", None, "Internal: run as a worker of this JSON spec.")
FLAGS = flags.FLAGS

NAME_KEYS = ("kind", "engine", "backbone", "size", "precision")  # a worker's name and log
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
# TensorFlow's variables of each TF engine (read when TensorFlow loads). The last: oneDNN
# keeps each weight in its own layout between calls (a serving-only setting).
TF_ENGINES = {"tf": {"TF_ENABLE_ONEDNN_OPTS": "0"}, "tf_onednn": {"TF_ENABLE_ONEDNN_OPTS": "1"},
              "tf_onednn_frozen": {"TF_ENABLE_ONEDNN_OPTS": "1",
                                   "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS": "1"}}
PEAK_N = 4096  # the practical peak's matmul: 4096 x 4096 float32


def optional(*modules):
    """The optional runtimes `modules`, imported lazily, or RuntimeError("could not
    load X: reason"), which a worker reports and the main process prints and skips."""
    loaded = []
    sys.modules.setdefault("triton", None)  # the CUDA torch wheel's GPU compiler: loading
    for module in modules:                   # it next to TensorFlow crashes; eager never uses it
        try:
            loaded.append(importlib.import_module(module))
        except Exception as e:  # noqa: BLE001  any failure to load is reported, not fatal
            raise RuntimeError(f"could not load {module}: {type(e).__name__}: {e}") from None
    return loaded[0] if len(loaded) == 1 else loaded


def cpu_info():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        text = f.read()
    present = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    return {"model": re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1).strip(),
            "mhz": float(re.search(r"^cpu MHz\s*:\s*(\S+)", text, re.M).group(1)),
            "flags": {f: f in present for f in CPU_FLAGS},
            "native_bf16": bool(present & {"avx512_bf16", "amx_bf16"})}


def load():
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def peak(engine):
    """GFLOP/s of the 4096^2 float32 matmul, best of 3 after one, in NumPy, TF or PyTorch."""
    a, b = (np.random.default_rng(i).random((PEAK_N, PEAK_N), np.float32) for i in (0, 1))
    if engine == "torch":
        a, b = optional("torch").from_numpy(a), optional("torch").from_numpy(b)
    elif engine != "numpy":
        a, b = tf.constant(a), tf.constant(b)
    seconds = timeit.repeat(lambda: np.asarray(a @ b), number=1, repeat=4)[1:]
    return 2 * PEAK_N ** 3 / min(seconds) / 1e9


def walk(model):
    """Every layer of `model`, nested functional models flattened."""
    for layer in model.layers:
        yield from (walk(layer) if isinstance(layer, keras.Model) else [layer])


def count_flops(model):
    """FLOPs per image: 2 x the multiply-adds of every Conv2D and Dense (layer shapes)."""
    layers = list(walk(model))
    macs = [np.prod(x.output.shape[1:]) * np.prod(x.kernel.shape[:3]) // x.groups
            for x in layers if isinstance(x, keras.layers.Conv2D)]
    return 2 * int(sum(macs + [np.prod(x.kernel.shape) for x in layers
                               if isinstance(x, keras.layers.Dense)]))


def synthetic(size, batch, num_classes, seed):
    """The random images (RGB in [0, 255]) and multi-hot labels every side gets."""
    labels = np.random.default_rng(seed + 1).random((batch, num_classes)) < 3.0 / num_classes
    labels[:, 0] = True  # at least one positive per image
    return (np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("f4"),
            labels.astype("f4"))


def convert(case_dir, size):
    """model.onnx (tf2onnx) and openvino.xml (OpenVINO's converter) of the export cut at
    `logits`, unless present; a failure is printed (that runtime's worker then fails)."""
    loaded = tf.saved_model.load(os.path.join(case_dir, "export", "1"))
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="images")
    function = tf.function(lambda images: {"logits": loaded.signatures["serve_tensor"](
        images=images)["logits"]}, input_signature=[spec])
    for module, path in (("tf2onnx", "model.onnx"), ("openvino", "openvino.xml")):
        path, start = os.path.join(case_dir, path), time.perf_counter()
        if os.path.exists(path):
            continue
        try:
            if module == "tf2onnx":
                optional(module).convert.from_function(function, [spec], opset=17, output_path=path)
            else:
                optional(module).save_model(optional(module).convert_model(function), path,
                                            compress_to_fp16=False)  # float32 weights
            print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001  reported; the other runtimes go on
            print(f"{path}: conversion failed: {type(e).__name__}: {e}", flush=True)


def export_case(spec):
    """Exports the crl model (weights.npz beside it), counts its FLOPs, converts it."""
    case_dir, c = spec["dir"], spec["num_classes"]
    info_path = os.path.join(case_dir, "info.json")
    if not os.path.exists(info_path):
        shutil.rmtree(case_dir, ignore_errors=True)  # an interrupted export
        keras.utils.set_random_seed(spec["seed"])
        model, rng = build_model(c, spec["backbone"], spec["size"]), np.random.default_rng(7)
        for bn in walk(model.inference_model):  # statistics as after training, for the test
            if isinstance(bn, keras.layers.BatchNormalization):
                n = bn.gamma.shape[0]
                bn.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                                rng.normal(0, 0.1, n), rng.uniform(0.5, 2.0, n)])
        export_lib.export_model(model, os.path.join(case_dir, "export"),
                                [f"class_{i}" for i in range(c)], version=1)
        np.savez(os.path.join(case_dir, "weights.npz"), **{
            v.path: keras.ops.convert_to_numpy(v) for v in model.inference_model.weights})
        with open(info_path, "w", encoding="utf-8") as f:
            json.dump({"flops": count_flops(model.inference_model)}, f)
    convert(case_dir, spec["size"])
    with open(info_path, encoding="utf-8") as f:
        return {"info": json.load(f)}


def serve_runners(spec):
    """{name: runner} of one serving engine on the case's random batch (its first b)."""
    x = synthetic(spec["size"], max(spec["batches"]), spec["num_classes"], spec["seed"])[0]
    inputs, engine, case_dir = {b: x[:b] for b in spec["batches"]}, spec["engine"], spec["dir"]
    if engine in TF_ENGINES:
        tensors, runners = {b: tf.constant(v) for b, v in inputs.items()}, {}
        for variant in ["=" + os.path.join(case_dir, "export", "1")] + spec["variants"]:
            name, path = variant.split("=", 1)
            loaded = tf.saved_model.load(path.format(dir=case_dir))  # owns the variables
            runners[f"{engine.replace('_', ' ')} {name}".strip()] = (
                lambda b, m=loaded: m.signatures["serve_tensor"](images=tensors[b])["logits"])
        return runners
    if engine == "onnxruntime":
        session = optional("onnxruntime").InferenceSession(
            os.path.join(case_dir, "model.onnx"), providers=["CPUExecutionProvider"])
        key = session.get_inputs()[0].name
        return {engine: lambda b: session.run(None, {key: inputs[b]})[0]}
    if engine == "openvino":
        core, bf16 = optional("openvino").Core(), cpu_info()["native_bf16"]
        model = core.read_model(os.path.join(case_dir, "openvino.xml"))
        print("openvino bf16: " + ("timed" if bf16 else "skipped (no avx512_bf16/amx_bf16)"))
        requests = {p: core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": p})
                    .create_infer_request() for p in ("f32", "bf16")[:1 + bf16]}
        return {"openvino" + " bf16" * (p == "bf16"): lambda b, r=r: r.infer({0: inputs[b]})[0]
                for p, r in requests.items()}
    torch, torchvision = optional("torch", "torchvision")
    torch.set_grad_enabled(False)
    arrays, runners = np.load(os.path.join(case_dir, "weights.npz")), {}
    tensors = {b: torch.from_numpy(v) for b, v in inputs.items()}
    for cl in (False, True):
        mods = torch_model(torch, torchvision, spec["backbone"], spec["num_classes"], arrays)
        mods = mods.eval().to(memory_format=torch.channels_last) if cl else mods.eval()
        runners["torch" + " channels_last" * cl] = (
            lambda b, m=mods, cl=cl: torch_logits(torch, m, tensors[b], spec["backbone"], cl)[0])
    return runners


def train_runners(spec):
    """{name: runner} of one training side: the CLI's step, or PyTorch's (NCHW and
    channels_last in float32, channels_last under autocast in bfloat16)."""
    c, precision = spec["num_classes"], spec["precision"]
    images, labels = synthetic(spec["size"], spec["batch"], c, spec["seed"])
    if spec["engine"] != "torch":  # the first TF worker writes the initial weights
        config = config_lib.Config(
            model_dir=tempfile.mkdtemp(dir=FLAGS.work_dir), train_files="unused",
            backbone=spec["backbone"], image_size=spec["size"], batch_size=spec["batch"],
            num_classes=c, steps_per_epoch=1, backbone_weights=None, lr_decay_epochs=(),
            precision=precision)
        trainer = trainer_lib.Trainer(config, [f"c{i}" for i in range(c)],
                                      tf.distribute.get_strategy(), spec["batch"])
        if not os.path.exists(spec["weights"]):
            np.savez(spec["weights"], **{v.path: keras.ops.convert_to_numpy(v)
                                         for v in trainer.model.weights})
        arrays = np.load(spec["weights"])
        for variable in trainer.model.weights:
            variable.assign(arrays[variable.path])
        batch = {"images": tf.constant(images), "labels": tf.constant(labels)}
        return {f"{spec['engine'].replace('_', ' ')} {precision}":
                lambda _: float(trainer.train_step(batch)["loss"])}
    torch, torchvision = optional("torch", "torchvision")
    arrays = np.load(spec["weights"])
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    bf16, runners = precision != "float32", {}
    for channels_last in (True,) if bf16 else (False, True):
        mods = torch_model(torch, torchvision, spec["backbone"], c, arrays)
        mods = mods.to(memory_format=torch.channels_last) if channels_last else mods
        head = [p for n, p in mods.named_parameters() if not n.startswith("trunk.")]
        optimizer = torch.optim.SGD([{"params": mods["trunk"].parameters(), "lr": 0.001},
                                     {"params": head, "lr": 0.01}],
                                    lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step(_, m=mods, opt=optimizer, cl=channels_last):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, maps = torch_logits(torch, m, x, spec["backbone"], cl)
                pads = [max((-(-n // 2) - 1) * 2 + 3 - n, 0) for n in maps.shape[2:]]
                z = torch.nn.functional.pad(maps, (pads[1] // 2, pads[1] - pads[1] // 2,
                                                   pads[0] // 2, pads[0] - pads[0] // 2))
                f_im = m["f_im"]  # its first conv with TensorFlow's "same" padding
                z = torch.relu(f_im["bn1"](f_im["conv1"](z)))
                z = f_im["conv3"](torch.relu(f_im["bn2"](f_im["conv2"](z)))).amax((2, 3))
                emb = m["f_l"](torch.eye(c))
            loss = torch_objective(torch, logits.float(), z.float(), emb.float(), y)
            loss.backward()
            opt.step()
            return float(loss)
        runners["torch" + " channels_last" * channels_last + " bf16" * bf16] = step
    return runners


def worker_main(spec):
    """A worker: prints its runners (or its one result), then runs them on request."""
    if spec["kind"] in ("export", "peak"):
        result = export_case(spec) if spec["kind"] == "export" else {"gflops": peak(spec["engine"])}
        return print("@@" + json.dumps(result), flush=True)
    try:
        runners = (serve_runners if spec["kind"] == "serve" else train_runners)(spec)
    except Exception as e:  # noqa: BLE001  reported to the main process, which skips it
        return print("@@" + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    print("@@" + json.dumps({"runners": list(runners)}), flush=True)
    for line in sys.stdin:  # until the main process closes stdin
        command = json.loads(line)
        start = time.perf_counter()
        value = np.asarray(runners[command["runner"]](command.get("batch")))  # waits for it
        print("@@" + json.dumps({"seconds": time.perf_counter() - start, "value": value.tolist()
                                 if command.get("value") else None}), flush=True)


# --- the main process: workers, interleaved rounds, tables ------------------------------

class Worker:
    """A worker subprocess of this script, with its engine's TensorFlow variables."""

    def __init__(self, spec):
        self.name = " ".join(str(spec[k]) for k in NAME_KEYS if spec.get(k))
        self.log = os.path.join(FLAGS.work_dir, "logs", re.sub(r"\W+", "_", self.name) + ".log")
        env = dict(os.environ, **TF_ENGINES.get(spec.get("engine"), TF_ENGINES["tf"]))
        with open(self.log, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), f"--work_dir={FLAGS.work_dir}",
                 f"--worker={json.dumps(spec)}"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self.hello = self.read()

    def read(self):
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
            print(f"  [{self.name}] {line.rstrip()}", flush=True)
        return {"error": f"the worker exited (its log: {self.log})"}

    def ask(self, **command):
        with contextlib.suppress(BrokenPipeError):  # a dead worker: read() says so
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        return self.read()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def start_workers(specs, errors, repeats, **command):
    """Starts the specs' workers and runs each runner `repeats` times first (correctness):
    ([(worker, runner)], {runner: [values]}); a worker that fails leaves, its reason in
    `errors`."""
    calls, values = [], {}
    for spec in specs:
        worker = Worker(spec)
        for name in worker.hello.get("runners", []):
            replies = [worker.ask(runner=name, value=True, **command) for _ in range(repeats)]
            if "error" in replies[-1]:  # the worker died
                worker.hello["error"] = replies[-1]["error"]
                break
            calls.append((worker, name))
            values[name] = [r["value"] for r in replies]
        if "error" in worker.hello:
            print(f"{spec['engine']}: {worker.hello['error']} -- left out", flush=True)
            errors[spec["engine"]] = worker.hello["error"]
            calls = [call for call in calls if call[0] is not worker]
            worker.close()
    return calls, values


def interleave(calls, rounds, batch=None):
    """{runner: [seconds]}: `rounds` rounds of one call per runner, the first rotating."""
    times = {name: [] for _, name in calls}
    for r in range(rounds):
        for i in range(len(calls)):
            worker, name = calls[(r + i) % len(calls)]
            times[name].append(worker.ask(runner=name, batch=batch)["seconds"])
            time.sleep(0.1)  # spinning thread pools go idle
    return times


def rows(times, flops, peak, peers, extra):
    """Table rows: ms, GFLOP/s (`flops` per call), share of `peak`, the paired ratios to
    the first runner and to the fastest of `peers`, then the cells `extra(name, median)`."""
    names, medians = list(times), {n: statistics.median(t) for n, t in times.items()}
    best = min(peers, key=medians.get) if peers else None

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b])) if b else np.nan
    out = []
    for name in names:
        gflops = flops / medians[name] / 1e9
        out.append(f"| {name} | {medians[name] * 1e3:.1f} | {gflops:.1f} | "
                   f"{100 * gflops / peak:.0f} % | {ratio(name, names[0]):.3f} | "
                   f"{ratio(name, best):.3f} | " + " | ".join(extra(name, medians[name])) + " |")
        print(out[-1], flush=True)
    return out


def serve_case(backbone, size, peak, out, errors):
    """Exports, converts, checks and times one serving case; its Markdown into `out`."""
    base = {"backbone": backbone, "size": size, "num_classes": FLAGS.num_classes,
            "seed": FLAGS.seed, "variants": FLAGS.variants, "dir": os.path.join(
                FLAGS.work_dir, f"{backbone}_{size}_c{FLAGS.num_classes}_s{FLAGS.seed}")}
    (exporter := Worker(dict(base, kind="export"))).close()  # exports and converts
    flops, batches = exporter.hello["info"]["flops"], [int(b) for b in FLAGS.batch_sizes]
    calls, values = start_workers([dict(base, kind="serve", engine=e, batches=batches)
                                   for e in FLAGS.engines], errors, 1, batch=batches[-1])
    logits = {n: np.array(v[0]) for n, v in values.items()}
    deltas = {n: np.abs(v - logits[calls[0][1]]).max() for n, v in logits.items()}
    out += [f"**{backbone}, {size} px, C = {FLAGS.num_classes}**: {flops / 1e9:.2f} GFLOP "
            f"per image (counted); logits up to {np.abs(logits[calls[0][1]]).max():.0f} in "
            f"magnitude (batch {batches[-1]}). Load {load()} at the start.", "",
            "| runtime | batch | ms | GFLOP/s | of peak | time / tf (paired) | time / best "
            "of ORT, OV (paired) | img/s | max \\|Δlogit\\| vs tf |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    peers = [n for _, n in calls if n.startswith(("onnxruntime", "openvino"))]
    for batch in batches:
        interleave(calls, FLAGS.warmup, batch)
        out += [row.replace(" |", f" | {batch} |", 1) for row in rows(
            interleave(calls, FLAGS.runs, batch), flops * batch, peak, peers,
            lambda n, m, b=batch: [f"{b / m:.2f}", f"{deltas[n]:.1e}"])]
    for worker in {id(w): w for w, _ in calls}.values():
        worker.close()
    out += ["", f"Load {load()} at the end.", ""]


def train_case(backbone, size, batch, peak, out, errors):
    """The CLI's step against PyTorch's, float32 then bfloat16; Markdown into `out`."""
    weights = os.path.join(tempfile.mkdtemp(dir=FLAGS.work_dir), "weights.npz")  # 1st TF worker
    flops = 3 * batch * count_flops(build_model(FLAGS.num_classes, backbone, size).inference_model)
    base, medians = {"kind": "train", "backbone": backbone, "size": size, "batch": batch,
                     "num_classes": FLAGS.num_classes, "seed": FLAGS.seed, "weights": weights}, {}
    out += [f"**{backbone}, {size} px, batch {batch}, C = {FLAGS.num_classes}**: "
            f"{flops / 1e9:.0f} GFLOP per step (3 x the counted forward). Load {load()} at "
            "the start.", "", "| step | ms | GFLOP/s | of peak | time / CLI (paired) | "
            "time / best PyTorch (paired) | bf16 / float32 | losses of steps 1, 2 | "
            "max \\|Δloss\\| vs CLI |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for precision, runs in (("float32", FLAGS.runs), ("mixed_bfloat16", FLAGS.bf16_runs)):
        if ("train" if precision == "float32" else "bf16") not in FLAGS.parts:
            continue
        calls, checked = start_workers([dict(base, engine=e, precision=precision) for e in
                                        FLAGS.engines if e in ("tf", "tf_onednn", "torch")],
                                       errors, 2)
        interleave(calls, max(FLAGS.warmup - 2, 0) if precision == "float32" else 0)
        times = interleave(calls, runs)
        for worker in {id(w): w for w, _ in calls}.values():
            worker.close()

        def extra(name, median, checked=checked, reference=calls[0][1]):
            medians[name] = median
            f32 = medians.get(name.replace("mixed_bfloat16", "float32").replace(" bf16", ""))
            delta = max(abs(a - b) for a, b in zip(checked[name], checked[reference]))
            return [f"{median / f32:.2f}" if f32 and f32 != median else "",
                    ", ".join(f"{v:.6f}" for v in checked[name]), f"{delta:.1e}"]
        out += rows(times, flops, peak, [n for _, n in calls if n.startswith("torch")], extra)
    out += ["", f"Load {load()} at the end.", ""]


def header(peaks, cpu, started):
    flag_text = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
                 for d in metadata.distributions()}
    versions = ", ".join(f"{p} {installed.get(p, 'not installed')}" for p in (
        "tensorflow-cpu", "onnxruntime", "tf2onnx", "openvino", "torch", "torchvision"))
    commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return [f"`python benchmarks/bench_runtimes.py {' '.join(sys.argv[1:])}` at commit "
            f"`{commit}`, {started}. CPU: {cpu['model']}, {os.cpu_count()} cores at "
            f"{cpu['mhz']:.0f} MHz; {flag_text}. {versions}.", "",
            "Practical peak (4096² float32 matmul, best of 3, this run): " + ", ".join(
                f"{k} {v:.1f}" for k, v in peaks.items()) + " GFLOP/s; the peak is their "
            f"maximum, {max(peaks.values()):.1f} (the nominal AVX2 FMA peak, 2 x 8 FMA per "
            f"cycle and core at that clock, is {os.cpu_count() * cpu['mhz'] * 0.032:.0f}).", ""]


def write_doc(part, text):
    """Replaces this script's `part` block of --doc (or appends one)."""
    begin, end = (f"<!-- bench_runtimes.py {part}: {w} -->" for w in ("begin", "end"))
    with open(FLAGS.doc, encoding="utf-8") as f:
        head, found, rest = f.read().partition(begin)
    doc = (head if found else head.rstrip("\n") + "\n\n") + f"{begin}\n{text}\n{end}" + (
        rest.partition(end)[2] if found else "\n")
    with open(FLAGS.doc, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv):
    del argv
    if FLAGS.worker:
        return worker_main(json.loads(FLAGS.worker))
    os.makedirs(os.path.join(FLAGS.work_dir, "logs"), exist_ok=True)
    for _ in range(FLAGS.wait_minutes if FLAGS.wait_load else 0):
        if os.getloadavg()[0] < FLAGS.wait_load:
            break
        print(f"load {load()}: waiting for < {FLAGS.wait_load}", flush=True)
        time.sleep(60)
    cpu, started, errors = cpu_info(), datetime.date.today().isoformat(), {}
    print(f"CPU {cpu['model']}, {cpu['flags']}, load {load()}", flush=True)
    peaks = {"NumPy": peak("numpy")}
    for engine, label in (("tf", "TF Eigen"), ("tf_onednn", "TF oneDNN"), ("torch", "PyTorch")):
        worker = Worker({"kind": "peak", "engine": engine})
        worker.close()
        peaks.update({label: worker.hello["gflops"]} if "gflops" in worker.hello else {})
    for part, run, cases, parts in (("serve", serve_case, FLAGS.serve_cases, {"serve"}),
                                    ("train", train_case, FLAGS.train_cases, {"train", "bf16"})):
        lines = []  # each part is written as soon as it is measured
        for case in cases if parts & set(FLAGS.parts) else []:
            run(case.split(":")[0], *map(int, case.split(":")[1:]), max(peaks.values()), lines,
                errors)
        text = "\n".join(header(peaks, cpu, started) + lines + [
            f"Could not load {k}: {v}" for k, v in errors.items()])
        print(text, flush=True)
        if lines and FLAGS.doc:
            write_doc(part, text)


if __name__ == "__main__":
    app.run(main)
