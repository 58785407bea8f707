"""The learner's processor uses the run's pixel bounds (the ones vLLM gets as `mm_processor_kwargs`), so an image
gets as many vision tokens in the learner as in the engine that sampled it."""
from PIL import Image

from actors.learner import LearnerRank
from pipeline.config import AlgoConfig, LearnerConfig, ModelConfig, RunConfig
from pipeline.placement import engine_processor_kwargs


def test_learner_processor_takes_the_run_pixel_bounds(tiny_reasoner_dir):
    cfg = RunConfig(model=ModelConfig(min_pixels=3136, max_pixels=6272))  # below the checkpoint's own 12,544
    rank = LearnerRank(str(tiny_reasoner_dir), LearnerConfig(), AlgoConfig(), rank=0, world_size=1,
                       processor_kwargs=engine_processor_kwargs(cfg))
    rank._load_processor()
    image = Image.new("RGB", (112, 112))  # 12,544 pixels: inside the checkpoint's bound, over the run's
    grid = rank.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid[1]) * int(grid[2]) * 14 * 14 <= 6272  # patches of 14 px: resized into the run's bound

    default = LearnerRank(str(tiny_reasoner_dir), LearnerConfig(), AlgoConfig(), rank=0, world_size=1)
    default._load_processor()
    grid = default.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid[1]) * int(grid[2]) * 14 * 14 == 12544  # the checkpoint's bound keeps it whole
