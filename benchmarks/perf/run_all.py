"""`make perf`: every perf measurement of this machine, printed as Markdown tables."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import aggregation  # noqa: E402
import cohort  # noqa: E402
import evaluation  # noqa: E402
import fisher  # noqa: E402
import grouped_conv  # noqa: E402
import kernels  # noqa: E402
import round_breakdown  # noqa: E402
import server_update  # noqa: E402
import stacked_clients  # noqa: E402
import throughput  # noqa: E402
import together  # noqa: E402
import triton_resources  # noqa: E402
import torch  # noqa: E402

# On a GPU the cohort table gets its GPU rows: both models, fp32 and bf16.
COHORT_GPU = ["--models", "simple_cnn", "resnet18", "--precisions", "32-true", "bf16-mixed", "--steps", "20"]
# Cross-cell cohorts of up to seven paper cells, each with the pixel pattern's 3 poisoning clients.
TOGETHER = ["--cells", "1", "2", "4", "7", "--attack", "pixel_pattern"]

if __name__ == "__main__":
    cohort_args = COHORT_GPU if torch.cuda.is_available() else []
    sections = [throughput.main([]), stacked_clients.main([]), cohort.main(cohort_args),
                together.main(TOGETHER + (["--steps", "20"] if torch.cuda.is_available() else [])), aggregation.main([]),
                round_breakdown.main([]), fisher.main([]), server_update.main([]), evaluation.main([]),
                triton_resources.main([])]
    if torch.cuda.is_available():  # on CPU the ops' own times say nothing of a GPU's kernels
        sections += [grouped_conv.main([]), kernels.main([])]
    print("\n\n".join(sections))
