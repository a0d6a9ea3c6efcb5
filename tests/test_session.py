"""A session's re-propagation: the same volume is encoded once, a changed painting trains from the
previous adapter (and stops on its plateau sooner than a cold start), the same painting again
trains from scratch and gives the same labels as a fresh process."""
import numpy as np
import SimpleITK as sitk

from FewShotSegmentLib import io, pipeline
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.session import Session

from test_server import synthetic_volume


def test_a_changed_painting_warm_starts_and_the_same_painting_does_not(tmp_path):
    image_path, template_path = synthetic_volume(tmp_path)
    image = io.read_image(image_path)
    template = io.read_labelmap(template_path, reference=image)
    painted = sitk.GetArrayFromImage(template)
    painted[5] = painted[4]                                   # "paint one more slice"
    more = sitk.GetImageFromArray(painted)
    more.CopyInformation(template)
    config = pipeline.resolved(PipelineConfig(steps=600, plateau_steps=50, refine="none", cache_dir="",
                                              device="cpu", compile="off", landmarks=False), image, template)
    session = Session()
    first, first_labels = pipeline.run(image, template, config, session=session)
    prepared = next(iter(session._volumes.values()))
    assert session.previous_model(prepared, config, Session.painting_key(more)) is first
    assert session.previous_model(prepared, config, Session.painting_key(template)) is None

    warm, warm_labels = pipeline.run(image, more, config, session=session)
    assert session.hits == {"backbone": 1, "volume": 1}          # built and encoded once
    # the second job encoded nothing, and says so (it reported the first job's encoding before)
    assert first_labels.summary["timings"]["encode_s"] > 0
    assert warm_labels.summary["timings"]["encode_s"] == 0.0
    cold, cold_labels = pipeline.run(image, more, config)        # the same painting, fresh process
    # measured: warm 200 steps, cold 350
    assert warm.adapter.steps_run < cold.adapter.steps_run

    again, again_labels = pipeline.run(image, more, config, session=session)
    assert again.adapter.steps_run == cold.adapter.steps_run     # same painting: from scratch
    assert np.array_equal(sitk.GetArrayFromImage(again_labels.labels), sitk.GetArrayFromImage(cold_labels.labels))
