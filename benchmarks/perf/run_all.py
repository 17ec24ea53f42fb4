"""`make perf`: every perf measurement of this machine, printed as Markdown tables."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import aggregation  # noqa: E402
import cohort  # noqa: E402
import round_breakdown  # noqa: E402
import stacked_clients  # noqa: E402
import throughput  # noqa: E402

if __name__ == "__main__":
    sections = [throughput.main([]), stacked_clients.main([]), cohort.main([]), aggregation.main([]),
                round_breakdown.main([])]
    print("\n\n".join(sections))
