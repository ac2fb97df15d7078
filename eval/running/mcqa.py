"""The multiple-choice runner (``--task mcqa``): every question of an MMAD file, one record each.

It is the score runner's discipline for questions instead of items: one record per question,
appended as it finishes (so ``--resume`` skips answered questions and ``--retry-errors`` asks
failed ones again), one run per folder, secrets blanked, a failure costs one question an error
record. The unit of work is the image: its :class:`ItemContext` (decoded images, reference
ranking, the expert's fit and reading, the query's encoded URL, the tools' per-item maps) is built
once and shared by the runs of its questions, which go through the graph one after another while
other images run beside them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

from anomalyclaw.config import redact
from anomalyclaw.errors import EndpointFatalError, ImageLoadError
from anomalyclaw.items import Item, Question
from anomalyclaw.paths import writable_folder
from anomalyclaw.threads import frozen_heap, limit_compute_threads, to_compute_thread
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.messages import warm_images
from anomalyclaw.graph.pipeline import shared_pipeline
from anomalyclaw.graph.state import new_state
from anomalyclaw.tools.item_context import ItemContext

from .records import Record, RecordWriter, RunLock, finished_ids, mcq_error_record, mcq_record_from_state
from .runner import Runner, RunSummary, _save_observation_images

log = logging.getLogger(__name__)


class AskedQuestion(Protocol):
    """What the runner needs of a question (``eval.data.mmad.MCQuestion``)."""

    question: Question

    @property
    def question_id(self) -> str: ...

    def meta(self) -> dict[str, Any]: ...


class QuestionImage(Protocol):
    """An image and its questions (``eval.data.mmad.MMADImage``)."""

    item: Item
    questions: list[Any]


class UnaskedQuestion(Protocol):
    """A question the loader rejected (``eval.data.mmad.RejectedQuestion``)."""

    question_id: str
    reasons: list[str]

    def meta(self) -> dict[str, Any]: ...


class McqRunner(Runner):
    """Runs the questions of images through the multiple-choice pipeline (``task="mcqa"``)."""

    def __init__(self, *args: Any, mmad_info: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.graph = shared_pipeline("mcqa")
        self.task = "mcqa"
        self.extra_info = {"mmad": dict(mmad_info or {})}

    async def run(self, images: Sequence[QuestionImage], *, rejected: Sequence[UnaskedQuestion] = (),
                  resume: bool = False, retry_errors: bool = False,
                  force: bool = False) -> RunSummary:  # type: ignore[override]
        """Answer every question of ``images`` (and write an error record per ``rejected`` one).
        A resume must match the folder's fingerprint unless ``force`` (see :meth:`Runner.run`)."""
        writable_folder(self.out_dir, "run folder")
        with RunLock(self.out_dir):
            return await self._run_questions(images, rejected, resume, retry_errors, force)

    async def _run_questions(self, images: Sequence[QuestionImage], rejected: Sequence[UnaskedQuestion],
                             resume: bool, retry_errors: bool, force: bool = False) -> RunSummary:
        self._open_folder(resume, retry_errors, force, what="questions")
        done = finished_ids(self.out_dir) if resume else set()
        n_questions = sum(len(im.questions) for im in images) + len(rejected)
        summary = RunSummary(out_dir=str(self.out_dir), n_items=n_questions)
        todo = [(im, [q for q in im.questions if q.question_id not in done]) for im in images]
        todo = [(im, qs) for im, qs in todo if qs]
        summary.n_skipped = sum(len(im.questions) for im in images) - sum(len(qs) for _, qs in todo)
        info_path = self._write_run_info(n_questions)
        start = time.perf_counter()
        with RecordWriter(self.out_dir, secrets=self.secrets) as writer:
            for r in rejected:
                if r.question_id in done:
                    summary.n_skipped += 1
                    continue
                self._write(writer, mcq_error_record(r.meta(), "question: " + "; ".join(r.reasons),
                                                     run_id=self.run_id, backend=self.vlm.backend,
                                                     model=self.vlm.model))
                summary.n_rejected += 1
                summary.n_errors += 1
            with limit_compute_threads(1), frozen_heap():
                await self._run_images(todo, writer, summary)
        summary.elapsed_s = round(time.perf_counter() - start, 3)
        summary.items_per_s = round(summary.n_done / summary.elapsed_s, 3) if summary.elapsed_s else 0.0
        self._collect_stats(summary)
        self._write_run_info(n_questions, summary=summary, path=info_path)
        return summary

    def _prepare(self, item: Item) -> ItemContext:
        """The image's shared context, with its images decoded, ranked and encoded (CPU work:
        the caller runs it in a worker thread)."""
        ctx = ItemContext(item, work_side=self.config.work_side, expert_pool=self.expert_pool,
                          score_cache=self.score_cache)
        ctx.preload()
        warm_images(make_context(ctx, self.vlm, registry=self.registry, prompts=self.prompts, config=self.config,
                                 encoder=self.encoder))
        return ctx

    async def ask(self, item: Item, ctx: ItemContext | None, question: AskedQuestion, setup_error: str | None = None
                  ) -> Record:
        """One question to one record; only :class:`EndpointFatalError` escapes."""
        start = time.perf_counter()
        kw = dict(run_id=self.run_id, backend=self.vlm.backend, model=self.vlm.model)
        meta = question.meta()

        def failed(reason: str) -> Record:
            return mcq_error_record(meta, redact(reason, self.secrets)[:1000], item=item,
                                    elapsed_s=time.perf_counter() - start, **kw)

        if setup_error is not None:
            return failed(setup_error)
        run = make_context(ctx, self.vlm, registry=self.registry, prompts=self.prompts, config=self.config,
                           encoder=self.encoder, question=question.question)
        try:
            state = await asyncio.wait_for(self.graph.ainvoke(new_state(question.question_id), context=run),
                                           timeout=self.item_timeout_s)
            if self.save_images:
                shown = Item(item_id=question.question_id, query_path=item.query_path, ref_paths=item.ref_paths)
                await to_compute_thread(_save_observation_images, self.out_dir, shown, state)
            return mcq_record_from_state(item, meta, state, elapsed_s=time.perf_counter() - start, **kw)
        except EndpointFatalError:
            raise
        except asyncio.TimeoutError:
            return failed(f"timed out after {self.item_timeout_s:.0f} s (item_timeout_s)")
        except ImageLoadError as exc:
            return failed(f"image: {exc}")
        except Exception as exc:  # one bad question must not stop the run
            log.exception("question %s failed", question.question_id)
            return failed(f"internal: {type(exc).__name__}: {exc}")

    async def _run_images(self, todo: list[tuple[QuestionImage, list[AskedQuestion]]], writer: RecordWriter,
                          summary: RunSummary) -> None:
        async def ask_all(job: tuple[QuestionImage, list[AskedQuestion]],
                          emit: Callable[[Record], Awaitable[None]]) -> None:
            image, questions = job
            ctx, setup_error = None, None
            if not image.item.ref_paths:
                setup_error = "no reference images: the question's image needs at least one normal template"
            else:
                try:
                    ctx = await to_compute_thread(self._prepare, image.item)
                except ImageLoadError as exc:
                    setup_error = f"image: {exc}"
                except Exception as exc:  # one bad image must not stop the run
                    log.exception("image %s: preparing it failed", image.item.item_id)
                    setup_error = f"internal: {type(exc).__name__}: {exc}"
            for question in questions:
                await emit(await self.ask(image.item, ctx, question, setup_error))

        await self._drive(todo, ask_all, writer, summary, size=lambda job: len(job[1]), unit="question")
