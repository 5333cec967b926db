// The demo page: plain fetch() calls to the JSON API (python_tasks/web/__init__.py), no build step.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

const sleep = (ms) => new Promise((res) => setTimeout(res, ms));
const fmtMs = (ms) => (ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0)) + " ms";

// Polls /api/tasks/<id> until the task is settled; onState sees every answer.
async function follow(taskId, onState, interval = 100) {
  for (;;) {
    const t = await api("GET", `/api/tasks/${taskId}`);
    onState(t);
    if (t.state === "SUCCESS") return t;
    if (t.state === "FAILURE" || t.state === "REVOKED") throw new Error(t.error || t.state);
    await sleep(interval);
  }
}

// 1. fib(n) on both engines, one after the other so they do not compete for the CPU.
$("fib-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const n = Number($("fib-n").value);
  $("fib-go").disabled = true;
  $("fib-error").textContent = "";
  for (const id of ["fib-native-ms", "fib-python-ms", "fib-native-result", "fib-python-result", "fib-ratio"]) $(id).textContent = "…";
  try {
    const nat = await api("GET", `/api/fib/native/${n}`);
    $("fib-native-ms").textContent = fmtMs(nat.ms);
    $("fib-native-result").textContent = nat.result;
    const py = await api("GET", `/api/fib/python/${n}`);
    $("fib-python-ms").textContent = fmtMs(py.ms);
    $("fib-python-result").textContent = py.result;
    // A sanitizer build of celeriac (the test suite's) can be slower than Python: say so rather than "0.8x faster".
    const ratio = py.ms / nat.ms;
    $("fib-ratio").textContent = (ratio >= 1 ? ratio : 1 / ratio).toFixed(1) + "×";
    $("fib-ratio-word").textContent = ratio >= 1 ? "faster" : "slower";
  } catch (e) {
    $("fib-error").textContent = e.message;
  } finally {
    $("fib-go").disabled = false;
  }
});

// 2. Bulk import: the bar follows the task's PROGRESS state ({done, total}), then the row count is read back.
function setBar(pct) {
  $("import-bar").style.width = pct + "%";
  $("import-progress").setAttribute("aria-valuenow", String(Math.round(pct)));
  $("import-pct").textContent = Math.round(pct) + "%";
}

$("import-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("import-go").disabled = true;
  $("import-error").textContent = "";
  $("import-count").textContent = "–";
  $("import-time").textContent = "";
  setBar(0);
  const seen = [];
  const t0 = performance.now();
  try {
    const job = await api("POST", "/api/import", { rows: Number($("import-rows").value), engine: $("import-engine").value });
    $("import-state").textContent = "queued";
    await follow(job.task_id, (t) => {
      seen.push(t.state + (t.percent !== undefined ? ":" + t.percent : ""));
      $("import-state").textContent = t.state === "PROGRESS" ? `PROGRESS ${t.done.toLocaleString()} / ${t.total.toLocaleString()}` : t.state;
      if (t.percent !== undefined) setBar(t.percent);
    }, 50);
    $("import-time").textContent = fmtMs(performance.now() - t0);
    const c = await api("GET", `/api/rows?batch=${job.batch}`);
    $("import-count").textContent = c.batch_rows.toLocaleString();
    $("import-total").textContent = c.total.toLocaleString();
  } catch (e) {
    $("import-error").textContent = e.message;
    $("import-state").textContent = "failed";
  } finally {
    $("import-progress").dataset.seen = seen.join(" ");
    $("import-go").disabled = false;
  }
});

// 3. Chord of native.add into native.xsum, joined on celeriac.
$("chord-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("chord-go").disabled = true;
  $("chord-error").textContent = "";
  $("chord-result").textContent = "…";
  const t0 = performance.now();
  try {
    const job = await api("POST", "/api/chord", { n: Number($("chord-n").value) });
    $("chord-expected").textContent = job.expected;
    const t = await follow(job.task_id, () => {}, 50);
    $("chord-result").textContent = t.result;
    $("chord-time").textContent = fmtMs(performance.now() - t0);
  } catch (e) {
    $("chord-error").textContent = e.message;
    $("chord-result").textContent = "–";
  } finally {
    $("chord-go").disabled = false;
  }
});

// 4. Workers answering a ping, refreshed every 5 s.
async function refreshWorkers() {
  const ul = $("workers-list");
  try {
    const { workers } = await api("GET", "/api/workers");
    ul.replaceChildren(...(workers.length ? workers : [null]).map((w) => {
      const li = document.createElement("li");
      if (!w) {
        li.className = "muted";
        li.textContent = "no worker answered";
        return li;
      }
      li.dataset.engine = w.engine;
      li.textContent = w.name;
      const tag = document.createElement("span");
      tag.className = "tag " + w.engine;
      tag.textContent = w.engine + (w.queues.length ? " · queue " + w.queues.join(", ") : "");
      li.appendChild(tag);
      return li;
    }));
  } catch (e) {
    ul.replaceChildren(Object.assign(document.createElement("li"), { className: "err", textContent: e.message }));
  }
}
$("workers-refresh").addEventListener("click", refreshWorkers);
refreshWorkers();
setInterval(refreshWorkers, 5000);
