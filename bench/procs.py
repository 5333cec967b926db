"""Process accounting from /proc (no psutil): a worker's whole process tree and its memory."""
import os


def descendants(pid):
    """pid and every live descendant, walking /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def _kb(path, field):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pid):
    """-> dict(rss_kb, pss_kb, nprocs) summed over the tree. RSS counts pages shared between the processes
    (e.g. a prefork parent and its children) once per process, as `ps` does; PSS splits them."""
    procs = descendants(pid)
    rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in procs)
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in procs)
    return {"rss_kb": rss, "pss_kb": pss, "nprocs": len(procs)}


def cpu_seconds(pid):
    """User+system CPU seconds of the tree's live processes (children that exited are not counted)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
        except (OSError, IndexError, ValueError):
            pass
    return total
