"""A fake engine implementing `stage1.data.engine.Engine`, what the data pipeline uses of `LLM` (with stage1.engine's
RequestOutput/SamplingParams), so the pipeline's tests run in milliseconds and without a model.

Its completions depend only on (prompt, seed, completion index), like a batch-invariant engine's, and it can be told
what to answer (`respond`) and, for a request that asks for logprobs, each token's logprob (`logprob`), to raise at
some step (a crash), or to feed the model other ids than the prompt's. It
schedules like the engine: at most `max_num_seqs` sequences run, waiting ones are admitted (a prefill step) as soon
as a slot is free, and each sequence then takes one decode step per token it generates, so requests finish out of
input order, after as many steps as their completions are long.

A test module or a subprocess script that needs its pieces imports them from here: a module named conftest is
another directory's in the whole suite.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stage1.engine.engine_core import StepStats
from stage1.engine.outputs import CompletionOutput, Logprob, RequestOutput

WORDS = ("river stone lantern quiet maple orbit velvet harbor signal meadow copper ember glacier willow cobalt "
         "thistle prairie beacon saffron canyon").split()


class FakeTokenizer:
    """Byte-level: one id per UTF-8 byte."""
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return None  # no control tokens in a byte vocabulary


@dataclass
class FakeSeq:
    request_id: str
    output: CompletionOutput
    steps: int  # tokens it generates: its completion, plus the stop token when it stopped
    done: int = 0


def instruction_of(prompt: str) -> str:
    """The instruction at the end of a prompt of either style."""
    last = prompt.rsplit("\n\n", 1)[-1]
    return last.removeprefix("Q: ").removesuffix("\nA:").rstrip("\n")


def default_respond(prompt: str, seed: int, index: int) -> str:
    rng = random.Random(f"{seed}:{index}")
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(9, 16))).capitalize() + "."


PARAGRAPHS = (
    ("The committee reviewed every proposal carefully and decided that the new library should open next spring "
     "with longer hours and more study rooms for students"),
    ("Regular exercise improves sleep and mood and lowers the risk of heart disease so most adults should aim for "
     "thirty minutes of activity on most days"),
)


def mixed_respond(prompt: str, seed: int, index: int) -> str:
    """A mix of good answers and each kind of bad one, decided by (seed, index) alone: empty, run-on, near-duplicates
    of two stock paragraphs (dedup state matters), leaked control tokens, scaffolding."""
    rng = random.Random(f"mixed:{seed}:{index}")
    roll = rng.random()
    if roll < 0.08:
        return ""
    if roll < 0.16:
        return " ".join(rng.choice(WORDS) for _ in range(400))  # no stop: hits max_tokens
    if roll < 0.36:
        return rng.choice(PARAGRAPHS) + rng.choice([".", "!", " indeed.", " today."])
    if roll < 0.42:
        return "Sure thing.<|im_end|>"
    if roll < 0.46:
        return "Fine.\nHere are examples of prompts and their completions:"
    return default_respond(prompt, seed, index) + "\n\nNext prompt:\nmore"


def default_logprob(seed: int, index: int, position: int) -> float:
    """A generated token's logprob: in [-3, 0), from (seed, completion index, token position) alone."""
    return -3 * random.Random(f"logprob:{seed}:{index}:{position}").random()


def rated_response(prompt: str) -> str | None:
    """The response a rating prompt (stage1.data.judge) rates, or None: the prompt is not a rating request."""
    from stage1.data.judge import DEFAULT_JUDGE_STYLE, load_judge_styles

    label = load_judge_styles()[DEFAULT_JUDGE_STYLE].label  # "...Response: {response}\nRating: "
    before, after = label.rsplit("{response}", 1)
    head = before.rsplit("}", 1)[-1]
    if not prompt.endswith(after) or head not in prompt:
        return None
    return prompt[:-len(after)].rsplit(head, 1)[1]


def default_rate(prompt: str) -> dict[str, float] | None:
    """A rating request's next-token logprobs (token text -> logprob), None for any other prompt: the digits 1-5 and
    two other tokens, from the rated response alone."""
    response = rated_response(prompt)
    if response is None:
        return None
    rng = random.Random(f"rate:{response}")
    return {token: -6 * rng.random() for token in ("1", "2", "3", "4", "5", " ", "\n")}


class FakeLLM:
    STEP_SECONDS = 0.01  # what each step adds to the stats' seconds (no time passes)

    def __init__(self, respond=default_respond, max_model_len: int = 8192, max_num_seqs: int = 256,
                 fail_at_step: int | None = None, corrupt_ids_from_request: int | None = None,
                 logprob=default_logprob, rate=default_rate):
        """respond(prompt, seed, index) -> the completion text; logprob(seed, index, position) -> the logprob of the
        completion's token at that position (reported when a request asks, SamplingParams.logprobs); fail_at_step:
        step() raises on that step (0-based); corrupt_ids_from_request: from that request on (0-based), report prompt
        ids that differ from the prompt's. rate(prompt) -> for a rating request (stage1.data.judge), the next
        token's logprobs by token text: its one token is the most likely, reported with the top `logprobs`; None for
        any other request."""
        self.tokenizer = FakeTokenizer()
        self.vocab_size = FakeTokenizer.vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = [0]
        self.stats = StepStats()  # the engine's own running totals; the fake has no prefix cache
        self.engine_info = {"device": "fake", "kernels": "fake"}
        self.respond = respond
        self.logprob = logprob
        self.rate = rate
        self.fail_at_step = fail_at_step
        self.corrupt_ids_from_request = corrupt_ids_from_request
        self.seen_prompts: list[str] = []  # of every request added, in order
        self.seen_params: list = []  # the SamplingParams of each
        self.finish_order: list[str] = []  # request ids, in the order they finished
        self.decode_log: list[tuple[int, int]] = []  # per decode step: (sequences run, requests added so far)
        self.most_in_flight = 0  # most sequences waiting or running at once
        self.steps = 0
        self.shut_down = False
        self._requests: dict[str, RequestOutput] = {}
        self._seqs: dict[str, list[FakeSeq]] = {}
        self._waiting: list[FakeSeq] = []
        self._running: list[FakeSeq] = []

    def shutdown(self):
        self.shut_down = True

    def add_request(self, prompt, sampling_params) -> str:
        ids = self.tokenizer.encode(prompt)
        if not ids or len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len {self.max_model_len}")
        request_id = f"req-{len(self.seen_prompts)}"
        if self.corrupt_ids_from_request is not None and len(self.seen_prompts) >= self.corrupt_ids_from_request:
            ids = ids[:-1] + [1]
        self.seen_prompts.append(prompt)
        self.seen_params.append(sampling_params)
        sp = sampling_params
        top = self.rate(prompt)
        seqs = [self._seq(request_id, self._complete(self.respond(prompt, sp.seed, k), sp, k) if top is None
                          else self._rating(top, sp, k)) for k in range(sp.n)]
        self._requests[request_id] = RequestOutput(request_id, prompt, ids, [s.output for s in seqs])
        self._seqs[request_id] = seqs
        self._waiting += seqs
        self.most_in_flight = max(self.most_in_flight, len(self._waiting) + len(self._running))
        return request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def abort(self, request_ids):
        for request_id in request_ids:
            self._requests.pop(request_id, None)
            for seq in self._seqs.pop(request_id, []):
                for queue in (self._waiting, self._running):
                    if seq in queue:
                        queue.remove(seq)

    def step(self) -> list[RequestOutput]:
        if self.fail_at_step is not None and self.steps == self.fail_at_step:
            raise RuntimeError("injected crash")
        self.steps += 1
        room = self.max_num_seqs - len(self._running)
        if self._waiting and room > 0:  # a prefill step: admits what fits, each admitted gets its first token
            batch, self._waiting = self._waiting[:room], self._waiting[room:]
            self._running += batch
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(len(self._requests[s.request_id].prompt_token_ids) for s in batch)
        elif self._running:
            batch = list(self._running)
            self._record_decode(len(batch))
        else:
            return []
        for seq in batch:
            seq.done += 1
            self.stats.generated_tokens += 1
        return self._finished()

    def _record_decode(self, n_seqs: int) -> None:
        self.stats.decode_steps += 1
        self.stats.decode_seconds += self.STEP_SECONDS
        if 2 * n_seqs < self.max_num_seqs:
            self.stats.low_occupancy_decode_steps += 1
            self.stats.low_occupancy_decode_seconds += self.STEP_SECONDS
        self.decode_log.append((n_seqs, len(self.seen_prompts)))

    def _finished(self) -> list[RequestOutput]:
        """The requests all of whose sequences are done; the latest added first (any order is allowed)."""
        self._running = [s for s in self._running if s.done < s.steps]
        done = [rid for rid, seqs in self._seqs.items() if all(s.done >= s.steps for s in seqs)]
        outputs = []
        for request_id in reversed(done):
            del self._seqs[request_id]
            self.finish_order.append(request_id)
            outputs.append(self._requests.pop(request_id))
        return outputs

    @staticmethod
    def _seq(request_id: str, output: CompletionOutput) -> FakeSeq:
        return FakeSeq(request_id, output, max(1, len(output.token_ids) + (output.finish_reason == "stop")))

    def _rating(self, top: dict[str, float], sp, index: int) -> CompletionOutput:
        """One greedy token, the most likely of `top` (lowest id on ties), with the top `sp.logprobs` of `top`."""
        ranked = sorted(((self.tokenizer.encode(text), lp) for text, lp in top.items()), key=lambda t: (-t[1], t[0]))
        assert all(len(ids) == 1 for ids, _ in ranked), "a rating's tokens are single bytes"
        (chosen,), chosen_lp = ranked[0]
        entry = {ids[0]: Logprob(lp, rank) for rank, (ids, lp) in enumerate(ranked[:sp.logprobs or 0], 1)}
        entry.setdefault(chosen, Logprob(chosen_lp, 1))
        return CompletionOutput(index, self.tokenizer.decode([chosen]), [chosen], "length", None, [entry], chosen_lp)

    def _complete(self, text: str, sp, index: int) -> CompletionOutput:
        """Stop strings cut (and are left out, as the engine does); max_tokens truncates with finish 'length'."""
        hits = [(text.find(s), s) for s in sp.stop_strings if s in text]
        stop = min(hits) if hits else None
        body = text[:stop[0]] if stop else text
        ids = self.tokenizer.encode(body)
        if len(ids) > sp.max_tokens:
            ids = ids[:sp.max_tokens]
            out = CompletionOutput(index, self.tokenizer.decode(ids), ids, "length", None)
        else:
            out = CompletionOutput(index, body, ids, "stop", stop[1] if stop else None)
        if sp.logprobs is not None:  # the chosen token's only: the pipeline asks for logprobs=0
            out.logprobs = [{token: Logprob(self.logprob(sp.seed, index, position), 1)}
                            for position, token in enumerate(ids)]
            out.cumulative_logprob = sum(entry[token].logprob for entry, token in zip(out.logprobs, ids))
        return out
