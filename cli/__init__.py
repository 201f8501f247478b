"""seglab's command line.

Importing it chooses Arrow's memory pool for the process and the ones it starts (Ray's
workers): the C library's malloc, unless the environment names one already. Arrow reads
``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow is imported, and its C++ parts (Parquet's
reader and writer among them) allocate from the pool chosen then, whatever
``pyarrow.set_memory_pool`` says later (pipeline/base/allocation.py sets only pyarrow's own
default). Under mimalloc, the default, a driver kept some 24 MiB of mimalloc's pages
resident by the middle of a 20,000-image run.
"""

import os

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
