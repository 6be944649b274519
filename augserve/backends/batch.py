"""Producing one augmented batch: check headers, draw plans, run the backend, apply the
bad-image policy; and for datasets with annotations, each sample's boxes, keypoints and label
mask through its plan. The server's producers and the in-process benchmarks both call this."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from augserve.backends.base import AugmentResult, Backend, DecodedSource, decodes_apart
from augserve.backends.masks import warp_mask
from augserve.core.errors import BadImageError, SpecError
from augserve.core.images import HeaderCache, UnreadableSource, inspect_image
from augserve.core.plan import SamplePlan, make_plan
from augserve.core.policy import BadImagePolicy
from augserve.core.sample import SkippedImage, SourceImage
from augserve.core.spec import AugmentSpec
from augserve.core.targets import SampleTargets, TargetRequest, TargetRules, transform_targets

if TYPE_CHECKING:  # the producer hands the dataset's annotations in (backends import no data)
    from augserve.data.annotated import DatasetTargets


@dataclass
class Batch:
    """An augmented batch: images [N, H, W, 3] uint8 RGB; sample_ids and labels [N] int64.
    With targets asked for: `targets[i]` the instances of image i in output coordinates, and
    `masks` [N, H, W] uint8 label maps (views of the `masks_out` given to `finish_batch`)."""

    images: np.ndarray | None  # None: written to device memory (`run_batch`'s device_pointer)
    sample_ids: np.ndarray
    labels: np.ndarray
    skipped: list[SkippedImage] = field(default_factory=list)
    targets: list[SampleTargets] | None = None
    masks: np.ndarray | None = None


def augment_batch(
    backend: Backend,
    spec: AugmentSpec,
    seed: int,
    epoch: int,
    sources: Sequence[SourceImage],
    policy: BadImagePolicy = BadImagePolicy(),
    out: np.ndarray | None = None,
    headers: HeaderCache | None = None,
    output_size: tuple[int, int] | None = None,
    decoded: DecodedSource | None = None,
) -> Batch:
    """Augment `sources` with the plans of (seed, epoch, sample_id).

    With `out` ([len(sources), H, W, 3] uint8, e.g. a shared-memory slot) the images are
    written there and the batch's images are its first rows. `headers` remembers header checks
    across batches. `output_size` (height, width in pixels) is the stream's output size, fixed
    when the stream opened (from the spec, or from the sizes the dataset was indexed with); it
    defaults to the size of `out`. With either, an image whose plan gives another size is a bad
    image (its file changed since indexing) rather than a failed batch. A source that
    `read_sources` could not read (`UnreadableSource`) is a bad image with the reader's reason.
    With `decoded`, a backend that decodes apart from augmenting (`decodes_apart`) takes each
    image's decode from it (another stream's decode of the same bytes, a cache, or its own);
    the pixels are the same either way.

    The three steps are also callable apart (`prepare_batch`, `run_batch`, `finish_batch`), so
    that a producer draws plans before it waits for its turn at the backend.
    """
    prepared = prepare_batch(spec, seed, epoch, sources, policy, out, headers, output_size)
    return finish_batch(prepared, run_batch(backend, prepared, decoded))


@dataclass
class PreparedBatch:
    """A batch with its header checks done and its plans drawn: `usable[i]` gets `plans[i]`;
    `skipped` holds what was left out so far; `out` is where its images go (or None)."""

    usable: list[SourceImage]
    plans: list[SamplePlan]
    skipped: list[SkippedImage]
    policy: BadImagePolicy
    out: np.ndarray | None
    empty_size: tuple[int, int]  # output size of a batch left with no usable image
    # With targets (`load_targets`): per usable sample its instances (stored-image coordinates)
    # and label map, and the rules that map them.
    targets: list[SampleTargets] | None = None
    masks: list[np.ndarray] | None = None
    rules: TargetRules | None = None

    @property
    def encoded(self) -> list[bytes]:
        return [source.data for source in self.usable]

    def reject(self, source: SourceImage, reason: str) -> None:
        """Leave `source` out for `reason`, or end the stream (BadImageError) by policy."""
        if self.policy.on_bad_image == "fail":
            raise BadImageError(source.source, reason)
        self.skipped.append(SkippedImage(source.sample_id, source.source, reason))


def prepare_batch(
    spec: AugmentSpec,
    seed: int,
    epoch: int,
    sources: Sequence[SourceImage],
    policy: BadImagePolicy = BadImagePolicy(),
    out: np.ndarray | None = None,
    headers: HeaderCache | None = None,
    output_size: tuple[int, int] | None = None,
) -> PreparedBatch:
    """Check headers and draw plans (`augment_batch`'s first step; pure Python, no backend)."""
    if output_size is None and out is not None:
        output_size = (int(out.shape[1]), int(out.shape[2]))
    elif output_size is not None and out is not None and tuple(out.shape[1:3]) != tuple(output_size):
        raise ValueError(f"out has images of {out.shape[1]}x{out.shape[2]}, expected output_size {output_size}")
    prepared = PreparedBatch([], [], [], policy, out, tuple(output_size or spec.fixed_output_size or (0, 0)))
    usable, plans, reject = prepared.usable, prepared.plans, prepared.reject
    # Looked up once, not per image: this loop is the producer's per-image Python.
    expected_size = None if output_size is None else tuple(output_size)
    max_pixels = policy.max_pixels

    for source in sources:
        if isinstance(source, UnreadableSource):
            reject(source, source.reason)
            continue
        try:
            if headers is None:
                header = inspect_image(source.data, source.source, max_pixels)
            else:
                header = headers.inspect(source.data, source.source, source.identity, max_pixels)
        except BadImageError as error:
            reject(source, error.reason)
            continue
        plan = make_plan(spec, seed, epoch, source.sample_id, (header.height, header.width), header.orientation)
        if expected_size is not None and plan.output_size != expected_size:
            # Specs without a fixed output size take the size the dataset was indexed with;
            # a file replaced by one of another size since then cannot fill this stream's slots.
            upright = (header.height, header.width) if header.orientation <= 4 else (header.width, header.height)
            reject(
                source,
                f"size changed to {upright[0]}x{upright[1]} since indexing (output "
                f"{plan.output_size[0]}x{plan.output_size[1]}, expected {output_size[0]}x{output_size[1]})",
            )
            continue
        usable.append(source)
        plans.append(plan)

    if plans and len({plan.output_size for plan in plans}) > 1:
        raise SpecError(
            "spec.ops",
            "images of this batch differ in size and the spec does not fix an output size; "
            "add crop, resize or random_resized_crop",
        )
    return prepared


def run_batch(
    backend: Backend,
    prepared: PreparedBatch,
    decoded: DecodedSource | None = None,
    turn: Callable[[], AbstractContextManager[object]] = nullcontext,
    device_pointer: int | None = None,
) -> AugmentResult | None:
    """Run the backend on a prepared batch (None when no image is left): `backend.augment`,
    or with `decoded` and a backend that decodes apart, `decoded.augment`. `turn()` is held
    while the backend runs (a producer's fair turn); `decoded` takes it only if it runs the
    backend itself (another producer may augment this batch while it decodes the images).
    With `device_pointer` (a backend that `writes_to_device`) the images go to that GPU
    address instead (`backend.augment_to_device`; the result's images are None)."""
    if not prepared.plans:
        return None
    if device_pointer is not None:
        with turn():
            return backend.augment_to_device(prepared.encoded, prepared.plans, device_pointer)
    out = prepared.out
    target = None if out is None else out[: len(prepared.plans)]
    if decoded is not None and decodes_apart(backend):
        return decoded.augment(backend, prepared.encoded, prepared.plans, target, turn)
    with turn():
        return backend.augment(prepared.encoded, prepared.plans, target)


def load_targets(prepared: PreparedBatch, annotations: DatasetTargets, request: TargetRequest) -> None:
    """Read the targets `request` asks for of every usable sample of `prepared` (before the
    backend runs, so that reading overlaps it). A sample whose label map cannot be read, or
    does not fit its image, is a bad image (left out, or the stream fails, by policy)."""
    kept_sources, kept_plans = [], []
    targets: list[SampleTargets] = []
    masks: list[np.ndarray] = []
    for source, plan in zip(prepared.usable, prepared.plans):
        if request.masks:
            try:
                mask = annotations.mask(source.sample_id)
                if mask.shape != tuple(plan.source_size):
                    raise ValueError(
                        f"label map is {mask.shape[1]}x{mask.shape[0]}, its image {plan.source_size[1]}x{plan.source_size[0]}"
                    )
            except ValueError as error:
                prepared.reject(source, str(error))
                continue
            masks.append(mask)
        if request.boxes:
            targets.append(annotations.targets(source.sample_id))
        kept_sources.append(source)
        kept_plans.append(plan)
    prepared.usable, prepared.plans = kept_sources, kept_plans
    prepared.targets = targets if request.boxes else None
    prepared.masks = masks if request.masks else None
    prepared.rules = request.rules(annotations.flip_pairs)


def finish_batch(prepared: PreparedBatch, result: AugmentResult | None, masks_out: np.ndarray | None = None) -> Batch:
    """The batch the backend's `result` makes, with its failures left out by policy; with
    targets loaded (`load_targets`), theirs too, label maps written into `masks_out`
    ([N, H, W] uint8, e.g. a shared-memory slot's mask rows) where given."""
    if result is None:
        out_h, out_w = prepared.empty_size
        empty = np.empty((0,), np.int64)
        batch = Batch(np.empty((0, out_h, out_w, 3), np.uint8), empty, empty.copy(), prepared.skipped)
        _finish_targets(prepared, [], batch, None if masks_out is None else masks_out[:0])
        return batch
    usable = prepared.usable
    for index, reason in sorted(result.failures.items()):
        prepared.reject(usable[index], reason)
    kept = [usable[index] for index in result.kept]
    batch = Batch(
        result.images,
        np.array([source.sample_id for source in kept], np.int64),
        np.array([source.label for source in kept], np.int64),
        sorted(prepared.skipped, key=lambda item: item.sample_id),
    )
    _finish_targets(prepared, result.kept, batch, masks_out)
    return batch


def _finish_targets(prepared: PreparedBatch, kept: list[int], batch: Batch, masks_out: np.ndarray | None) -> None:
    """The kept samples' targets through their plans (host maths, the same for every backend)."""
    rules = prepared.rules
    if rules is None:
        return
    if prepared.targets is not None:
        batch.targets = [transform_targets(prepared.targets[index], prepared.plans[index], rules) for index in kept]
    if prepared.masks is not None:
        height, width = batch.images.shape[1:3]
        masks = np.empty((len(kept), height, width), np.uint8) if masks_out is None else masks_out[: len(kept)]
        for row, index in enumerate(kept):
            masks[row] = warp_mask(prepared.masks[index], prepared.plans[index], rules)
        batch.masks = masks
