"""HTTP soak: the real Cog server (coglet) on a tiny fixture checkpoint, fp32, COG_MAX_CONCURRENCY=8,
sent 1,000 predictions (--predictions, SOAK_PREDICTIONS) in waves on loopback (`make soak` runs it
after the schedule seeds).

The mix: image questions (prompts of 800 to 2000 tokens, longer than a prefill chunk) on images the
server has not seen and on repeated ones, predictions cancelled with PUT + /cancel, clients that
disconnect mid-answer, and a few bad inputs (a corrupt image, a prompt longer than the context).
The well-formed questions are drawn from a pool of ASK_POOL distinct ones (a quarter of the count if
fewer), so that the solo texts they are checked against take minutes, not an hour, whatever the count.

It checks that every success has the text the same request gets alone in this process (prefix cache
off), that only the bad inputs fail and each with its own message, that 409 comes only for requests
beyond the concurrency, that the server is READY at the end, and that the worker's resident memory
is flat over the last half of the waves (after a warm-up of the heaviest waves, the first half
lets the heap's high-water mark settle: glibc keeps freed blocks): its growth there, as measured in
`rss_growth`, must stay under 1%. It prints one summary line and the RSS series, and exits 1 on any
failure. Every wait is bounded. 1,000 predictions took 15 min 39 s on an idle 2-core AVX512 Xeon
(model 167), a minute of it for the solo texts of 166 questions; worker RSS trend +0.23%.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2 import Engine, build_messages, load_image  # noqa: E402
from deepseek_vl2.serving.local_server import HOST, LocalCogServer  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CHECKPOINT = FIXTURES / "checkpoints" / "tiny-mla"
CONCURRENCY = 8
PREDICTIONS = 1000
PREDICTIONS_ENV = "SOAK_PREDICTIONS"
ASK_POOL = 160
RSS_GROWTH_LIMIT = 0.01
WARM_UP_ROUNDS = 3  # memory use climbs over about three rounds of the same heavy waves, then stays
WAIT_S = 300.0  # the most any one prediction or settling may take
QUESTIONS = ["Describe this image.", "What is in the picture?", "Which colours dominate?", "Count the objects."]
BASE_IMAGES = ["vqa_1.jpg", "multi_image_1.jpeg", "multi_image_2.jpeg", "visual_grounding_1.jpeg"]
CORRUPT_IMAGE = "data:image/png;base64," + base64.b64encode(b"not an image").decode()


@dataclass(frozen=True)
class Ask:
    """One well-formed request, sampled with its own seed."""

    images: tuple[str, ...]  # names of PNG files in the soak's image directory
    question: str
    seed: int
    max_new_tokens: int

    def inputs(self, folder: Path) -> dict:
        inputs: dict = {f"image{i}": png_uri(folder / name) for i, name in enumerate(self.images, 1)}
        return inputs | {
            "text": self.question, "max_new_tokens": self.max_new_tokens, "temperature": 0.8,
            "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "seed": self.seed,
        }  # fmt: skip


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def make_images(folder: Path, rng: random.Random) -> tuple[list[str], list[str]]:
    """The fixture images as PNGs (repeated across the run), and new images made from them
    (flipped, rotated, cropped) that the measured waves see first."""
    repeated, new = [], []
    for name in BASE_IMAGES:
        image = Image.open(FIXTURES / "images" / name).convert("RGB")
        image.save(folder / f"{name}.png")
        repeated.append(f"{name}.png")
        variants = [
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            image.rotate(rng.choice([90, 270]), expand=True),
            image.crop((0, 0, image.width * 3 // 4, image.height * 3 // 4)),
            image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
            image.rotate(180),
            image.crop((image.width // 3, 0, image.width, image.height)),
        ]
        for index, variant in enumerate(variants):
            variant.save(folder / f"{name}.{index}.png")
            new.append(f"{name}.{index}.png")
    return repeated, new


@dataclass
class Action:
    kind: str  # "ask", "cancel", "disconnect", "corrupt" or "oversized"
    ask: Ask | None = None
    delay_s: float = 0.0  # cancel / disconnect after this long


def plan(rng: random.Random, repeated: list[str], new: list[str], predictions: int) -> list[list[Action]]:
    """Waves of at most CONCURRENCY predictions, but for overflow waves of plain questions
    (CONCURRENCY + 2 at once: the second wave, then every 7th); `predictions` in all. The
    questions are new draws until ASK_POOL distinct ones (a quarter of `predictions` if fewer)
    were drawn, then picks among those."""
    unused = list(new)
    rng.shuffle(unused)
    pool: dict[Ask, None] = {}  # insertion-ordered, for a reproducible pick

    def draw() -> Ask:
        fresh = unused.pop() if unused and rng.random() < 0.4 else None
        first = fresh or rng.choice(repeated + new[: len(new) - len(unused)])
        images = (first,) if rng.random() < 0.7 else (first, rng.choice(repeated))
        return Ask(images, rng.choice(QUESTIONS), rng.randrange(4), rng.choice([4, 8, 16]))

    pool_size = min(ASK_POOL, max(predictions // 4, 1))

    def ask() -> Ask:
        if len(pool) < pool_size:
            pool[chosen := draw()] = None
            return chosen
        return rng.choice(list(pool))

    def action() -> Action:
        roll = rng.random()
        if roll < 0.1:
            return Action("cancel", delay_s=rng.uniform(0.2, 2.0))
        if roll < 0.2:
            return Action("disconnect", delay_s=rng.uniform(0.2, 2.0))
        if roll < 0.23:
            return Action("corrupt")
        if roll < 0.26:
            return Action("oversized")
        return Action("ask", ask())

    waves, sent = [], 0
    while sent < predictions:
        if len(waves) % 7 == 1:
            wave = [Action("ask", ask()) for _ in range(CONCURRENCY + 2)]
        else:
            wave = [action() for _ in range(rng.randint(CONCURRENCY - 3, CONCURRENCY))]
        wave = wave[: predictions - sent]
        waves.append(wave)
        sent += len(wave)
    return waves


def warm_up(repeated: list[str]) -> list[list[Action]]:
    """Rounds of the heaviest waves: as many prompts as the server admits, each two tiled images
    or a prompt too long for the context, and cancelled and abandoned answers."""
    pairs = [(repeated[0], repeated[1]), (repeated[2], repeated[3])]
    asks = [Action("ask", Ask(pairs[i % 2], QUESTIONS[0], i % 3, 8)) for i in range(CONCURRENCY)]
    oversized = [Action("oversized") for _ in range(CONCURRENCY)]
    dropped = [Action(kind, delay_s=1.0) for kind in ("cancel", "disconnect") for _ in range(CONCURRENCY // 2)]
    return [asks, oversized, dropped] * WARM_UP_ROUNDS


# What the engine logs when it drops a cancelled or abandoned request (engine/scheduler.py), and
# how long a wave waits for its drops.
DROPPED_LINE = "cancelled after"
DROP_WAIT_S = 30.0
# A question that runs for thousands of tokens unless cancelled.
ENDLESS = {"text": "Count.", "max_new_tokens": 4000, "temperature": 0}


class Soak:
    def __init__(self, server: LocalCogServer, folder: Path, repeated: list[str], solo: dict[Ask, str]) -> None:
        self.server, self.folder, self.solo = server, folder, solo
        self.endless = ENDLESS | {"image1": png_uri(folder / repeated[0])}
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._ids = iter(range(10**6))

    def problem(self, message: str) -> None:
        with self._lock:
            self.problems.append(message)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def run_wave(self, wave: list[Action]) -> None:
        drops_before = self.server.log_text().count(DROPPED_LINE)
        with ThreadPoolExecutor(len(wave)) as pool:
            statuses = list(pool.map(self.run_action, wave))
        rejected = statuses.count(409)
        self.counts["409"] += rejected
        if rejected > max(len(wave) - CONCURRENCY, 0):
            self.problem(f"{rejected} answers 409 in a wave of {len(wave)} (concurrency {CONCURRENCY})")
        # A cancelled or abandoned prediction holds its slot until the engine drops it, at its next
        # step, which may be seconds of vision work away; the server says READY as soon as one
        # slot is free. Without this wait the next full wave met a slot still held: one 409. Not
        # every one reaches the engine (a cancel can end a prediction before predict() runs), so
        # the wait is bounded and a shortfall is no fault: only a 409 in the next wave would be.
        dropped = sum(1 for a, s in zip(wave, statuses) if a.kind in ("cancel", "disconnect") and s != 409)
        if dropped:
            self.server.wait_for_log(DROPPED_LINE, drops_before + dropped, DROP_WAIT_S)
        if self.server.settled_status(WAIT_S) != "READY":
            self.problem(f"not READY after a wave: {self.server.health_status()}")

    def run_action(self, action: Action) -> int:
        """Send one prediction and check its outcome; the HTTP status (0: disconnected)."""
        if action.kind == "disconnect":
            return self.disconnect(action.delay_s)
        if action.kind == "cancel":
            return self.cancel(action.delay_s)
        if action.kind == "ask":
            assert action.ask is not None
            status, body = self.server.predict(action.ask.inputs(self.folder), timeout_s=WAIT_S)
            if status == 200 and body.get("status") == "succeeded":
                self.count("succeeded")
                if body["output"]["text_out"] != self.solo[action.ask]:
                    self.problem(f"{action.ask}: got {body['output']['text_out']!r}, alone {self.solo[action.ask]!r}")
            elif status != 409:
                self.problem(f"{action.ask}: HTTP {status}, {str(body)[:300]}")
            return status
        inputs, message = {
            "corrupt": ({"image1": png_uri(self.folder / "vqa_1.jpg.png"), "image2": CORRUPT_IMAGE},
                        "image2 could not be read as an image"),
            "oversized": ({"image1": png_uri(self.folder / "vqa_1.jpg.png"), "text": "word " * 5000},
                          "but the model's context holds 4096"),
        }[action.kind]  # fmt: skip
        status, body = self.server.predict(inputs, timeout_s=WAIT_S)
        if status == 200 and body.get("status") == "failed" and message in body.get("error", ""):
            self.count(f"refused {action.kind}")
        elif status != 409:
            self.problem(f"{action.kind} input: HTTP {status}, {str(body)[:300]}")
        return status

    def cancel(self, delay_s: float) -> int:
        prediction_id = f"soak-{next(self._ids)}-{os.getpid()}"
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(self.server.predict, self.endless, prediction_id, WAIT_S)
            time.sleep(delay_s)
            cancel_status = self.server.cancel(prediction_id)
            for _ in range(20):  # 404 while the server has not yet seen the PUT
                if cancel_status != 404 or answer.done():
                    break
                time.sleep(0.2)
                cancel_status = self.server.cancel(prediction_id)
            status, body = answer.result()
        if status == 200 and body.get("status") == "canceled" and cancel_status == 200:
            self.count("cancelled")
        elif status != 409:
            self.problem(f"cancelled prediction: HTTP {status} (cancel: {cancel_status}), {str(body)[:300]}")
        return status

    def disconnect(self, delay_s: float) -> int:
        connection = http.client.HTTPConnection(HOST, self.server.port, timeout=WAIT_S)
        try:
            connection.request(
                "POST", "/predictions", json.dumps({"input": self.endless}), {"Content-Type": "application/json"}
            )
            time.sleep(delay_s)
        finally:
            connection.close()  # the client goes away mid-answer
        self.count("disconnected")
        return 0


def worker_rss_bytes(server_pid: int) -> int:
    """Resident memory of the server's largest descendant: the worker that holds the model."""
    largest, pending = 0, [server_pid]
    while pending:
        pid = pending.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue  # the process has just exited
        if pid != server_pid:
            largest = max(largest, int(fields["VmRSS"].split()[0]) * 1024)
    return largest


def theil_sen_slope(values: list[float]) -> float:
    """The median of the slopes between every two samples (per sample step): a straight line's
    slope that a few outliers cannot move (up to 29% of the samples)."""
    slopes = [(values[j] - values[i]) / (j - i) for i in range(len(values)) for j in range(i + 1, len(values))]
    return median(slopes) if slopes else 0.0


def rss_growth(rss: list[int]) -> tuple[float, str]:
    """Growth of the worker's RSS over the last half of the waves, as a fraction of the RSS at the
    half-way point, and a line of figures.

    One reading moves by up to ~60 MiB from wave to wave with what the heap holds at that moment
    (glibc's high-water marks), several times the 1% being looked for, so no two single readings are
    compared: the growth is the Theil-Sen slope over the last half's readings times their number,
    i.e. the trend a steady leak would draw, which the spikes do not move. The least-squares slope
    and the peak of the last quarter are printed beside it for comparison."""
    half = rss[len(rss) // 2 :]
    base = median(half[:3])  # the half-way reading, steadied by its neighbours
    trend = theil_sen_slope(half) * len(half)
    mean_x, mean_y = (len(half) - 1) / 2, sum(half) / len(half)
    denominator = sum((x - mean_x) ** 2 for x in range(len(half))) or 1.0
    least_squares = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(half)) / denominator * len(half)
    peak = max(half[len(half) // 2 :])
    mib = 2**20
    figures = (
        f"last {len(half)} waves from {base / mib:.0f} MiB: Theil-Sen trend {trend / mib:+.1f} MiB "
        f"({trend / base:+.2%}), least squares {least_squares / mib:+.1f} MiB ({least_squares / base:+.2%}), "
        f"last-quarter peak {peak / mib:.0f} MiB ({peak / base - 1:+.2%}); whole run {rss[0] / mib:.0f} -> "
        f"{rss[-1] / mib:.0f} MiB, min {min(rss) / mib:.0f}, max {max(rss) / mib:.0f}"
    )
    return trend / base, figures


def progress(message: str) -> None:
    print(f"soak {time.strftime('%H:%M:%S')}: {message}", file=sys.stderr, flush=True)


def solo_texts(asks: set[Ask], folder: Path) -> dict[Ask, str]:
    """Each request's text alone, in this process, prefix cache off (what the server must give)."""
    texts = {}
    with Engine.from_pretrained(CHECKPOINT, prefix_cache_bytes=0) as engine:
        for ask in sorted(asks, key=repr):
            images = [load_image(folder / name, f"image{i}", allow_local_files=True) for i, name in enumerate(ask.images, 1)]
            result = engine.generate(
                build_messages(ask.question, len(images)), images, max_new_tokens=ask.max_new_tokens,
                temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=ask.seed,
            )  # fmt: skip
            texts[ask] = result.text
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=14, help="draws the waves (default 14)")
    parser.add_argument(
        "--predictions", type=int, default=int(os.environ.get(PREDICTIONS_ENV) or PREDICTIONS),
        help=f"predictions measured after the warm-up (default ${PREDICTIONS_ENV} or {PREDICTIONS})",
    )  # fmt: skip
    args = parser.parse_args()
    if args.predictions < 4 * CONCURRENCY:
        parser.error(f"--predictions must be at least {4 * CONCURRENCY}: the RSS check needs waves")
    started = time.monotonic()
    os.environ["DEEPSEEK_VL2_DTYPE"] = "float32"  # the fixtures' dtype, here and in the server
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        folder = Path(directory)
        repeated, new = make_images(folder, rng)
        # Warm-up: the heaviest waves; the first half of the measured waves warms up further.
        warm_up_waves = warm_up(repeated)
        waves = plan(rng, repeated, new, args.predictions)
        asks = {a.ask for wave in waves + warm_up_waves for a in wave if a.ask is not None}
        progress(f"{len(asks)} distinct questions alone, in this process")
        solo = solo_texts(asks, folder)
        environment = {
            "DEEPSEEK_VL2_WEIGHTS": str(CHECKPOINT),
            "COG_MAX_CONCURRENCY": str(CONCURRENCY),
            "DEEPSEEK_VL2_DTYPE": "float32",
            "DEEPSEEK_VL2_ALLOW_LOCAL_FILES": "0",
            # glibc gives each thread that allocates its own heap arena (up to 8 per core), and
            # each keeps its freed blocks: with coglet's and torch's threads the worker's RSS kept
            # climbing in steps (two runs of 200 predictions: 1316 -> 1456 MiB, +1.70% over the last
            # half; 1285 -> 1356 MiB, +0.85%). Two arenas: 807 -> 1128 MiB, +0.00%; 989 -> 1087
            # MiB, +0.03%; and it goes down again between waves. The image sets the same
            # (cog.yaml `environment`).
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
        }
        with LocalCogServer(environment) as server:
            soak = Soak(server, folder, repeated, solo)
            for wave in warm_up_waves:
                soak.run_wave(wave)
            soak.counts.clear()  # the summary counts the measured predictions only
            rss = []
            progress(f"{len(waves)} waves of {args.predictions} predictions after {len(warm_up_waves)} warm-up waves")
            for index, wave in enumerate(waves, 1):
                soak.run_wave(wave)
                rss.append(worker_rss_bytes(server.pid))
                if index % 10 == 0:
                    progress(f"wave {index}/{len(waves)}: worker RSS {rss[-1] / 2**20:.0f} MiB")
            status = server.settled_status(WAIT_S)
            dropped = server.log_text().count(DROPPED_LINE)
    growth, figures = rss_growth(rss)
    if growth >= RSS_GROWTH_LIMIT:
        soak.problem(f"worker RSS grew {growth:.2%} over the last half of the waves (limit {RSS_GROWTH_LIMIT:.0%})")
    if status != "READY":
        soak.problem(f"server {status} at the end")
    sent = sum(len(wave) for wave in waves)
    outcomes = ", ".join(f"{n} {name}" for name, n in sorted(soak.counts.items()))
    print(
        f"soak {'PASSED' if not soak.problems else 'FAILED'}: {sent} predictions in {len(waves)} waves "
        f"(concurrency {CONCURRENCY}) after {len(warm_up_waves)} warm-up waves: {outcomes}; {dropped} "
        f"dropped by the engine mid-answer (warm-up included); every success had its solo text: "
        f"{not any('alone' in p for p in soak.problems)}; worker RSS growth over the last half "
        f"{growth:+.2%}; server {status}; {time.monotonic() - started:.0f} s"
    )
    print("  worker RSS " + figures)
    print("  worker RSS after each wave (MiB): " + " ".join(f"{r / 2**20:.0f}" for r in rss))
    for problem in soak.problems:
        print("  " + problem)
    return 1 if soak.problems else 0


if __name__ == "__main__":
    sys.exit(main())
