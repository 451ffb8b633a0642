"""Block IO counters as the kernel writes them, v1 and v2, summed over devices."""

from __future__ import annotations

from jobworker.cgroups import cgfs

V1_IO_SERVICE_BYTES = """\
8:0 Read 4096
8:0 Write 1048576
8:0 Sync 1048576
8:0 Async 4096
8:0 Discard 0
8:0 Total 1052672
253:0 Read 8192
253:0 Write 0
Total 1060864
"""

V2_IO_STAT = """\
8:0 rbytes=4096 wbytes=1048576 rios=1 wios=16 dbytes=0 dios=0
253:0 rbytes=8192 wbytes=0 rios=2 wios=0 dbytes=0 dios=0
"""


def test_v1_sums_reads_and_writes_over_devices_and_ignores_the_rest() -> None:
    assert cgfs.parse_io_v1(V1_IO_SERVICE_BYTES) == (12288, 1048576)


def test_v2_sums_rbytes_and_wbytes_over_devices() -> None:
    assert cgfs.parse_io_v2(V2_IO_STAT) == (12288, 1048576)


def test_no_device_line_means_not_measured() -> None:
    assert cgfs.parse_io_v1("Total 0\n") is None
    assert cgfs.parse_io_v2("") is None
    assert cgfs.parse_io_v2("8:0 rios=1\n") is None  # no byte counters: nothing to say
