// The demo page as a user sees it: Debian's chromium, headless, driven by playwright-core.
// Usage: node demo.mjs URL ARTIFACT_DIR   (tests/integration/test_web.py runs it against a running stack)
// Env: CHROMIUM (default /usr/bin/chromium). Prints one JSON line with what it saw; exit 1 on any failure,
// after saving a screenshot of the page as it was (ARTIFACT_DIR/demo-failure.png).
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const [url, artifacts] = process.argv.slice(2);
if (!url || !artifacts) {
  console.error("usage: node demo.mjs URL ARTIFACT_DIR");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const IMPORT_ROWS = Number(process.env.IMPORT_ROWS || 200000);
const FIB_N = Number(process.env.FIB_N || 30);
const STEP_MS = 60000;

fs.mkdirSync(artifacts, { recursive: true });
// launch() gives the browser a fresh profile in a temp dir of its own (a fresh --user-data-dir) and removes it.
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const seen = { consoleErrors: [] };
let page;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 600 } });
  page.setDefaultTimeout(STEP_MS);
  page.on("console", (m) => { if (m.type() === "error") seen.consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => seen.consoleErrors.push(String(e)));
  await page.goto(url, { waitUntil: "load" });

  // 4. both workers listed
  await page.waitForSelector('#workers-list li[data-engine="celeriac"]');
  await page.waitForSelector('#workers-list li[data-engine="python"]');
  seen.workers = await page.$$eval("#workers-list li", (lis) => lis.map((li) => li.textContent));

  // 1. compute fib(n): both timings and the ratio appear
  await page.fill("#fib-n", String(FIB_N));
  await page.click("#fib-go");
  await page.waitForFunction(() => /×$/.test(document.getElementById("fib-ratio").textContent) ||
                                   document.getElementById("fib-error").textContent !== "");
  seen.fib = await page.evaluate(() => Object.fromEntries(
    ["fib-native-ms", "fib-python-ms", "fib-native-result", "fib-python-result", "fib-ratio", "fib-ratio-word",
     "fib-error"]
      .map((id) => [id, document.getElementById(id).textContent])));

  // 2. start an import: sample the bar while it moves, until the row count shows
  await page.fill("#import-rows", String(IMPORT_ROWS));
  await page.selectOption("#import-engine", "native");
  await page.click("#import-go");
  const bar = [];
  const deadline = Date.now() + STEP_MS;
  for (;;) {
    const s = await page.evaluate(() => ({
      now: document.getElementById("import-progress").getAttribute("aria-valuenow"),
      state: document.getElementById("import-state").textContent,
      count: document.getElementById("import-count").textContent,
      error: document.getElementById("import-error").textContent,
    }));
    if (bar[bar.length - 1] !== s.now) bar.push(s.now);
    if (s.count !== "–" || s.error || Date.now() > deadline) break;
    await page.waitForTimeout(20);
  }
  // The bar is drawn full (its width has a 0.15 s transition).
  await page.waitForFunction(() => document.getElementById("import-bar").getBoundingClientRect().width >=
    document.getElementById("import-progress").getBoundingClientRect().width - 0.5, null, { timeout: 5000 })
    .catch(() => {});
  seen.import = await page.evaluate(() => ({
    pct: document.getElementById("import-pct").textContent,
    width: document.getElementById("import-bar").style.width,
    barPixels: document.getElementById("import-bar").getBoundingClientRect().width,
    trackPixels: document.getElementById("import-progress").getBoundingClientRect().width,
    state: document.getElementById("import-state").textContent,
    count: document.getElementById("import-count").textContent,
    total: document.getElementById("import-total").textContent,
    error: document.getElementById("import-error").textContent,
    states: document.getElementById("import-progress").dataset.seen,
  }));
  seen.import.bar = bar;

  // 3. the chord
  await page.fill("#chord-n", "100");
  await page.click("#chord-go");
  await page.waitForFunction(() => /^\d+$/.test(document.getElementById("chord-result").textContent) ||
                                   document.getElementById("chord-error").textContent !== "");
  seen.chord = await page.evaluate(() => ({
    result: document.getElementById("chord-result").textContent,
    expected: document.getElementById("chord-expected").textContent,
    error: document.getElementById("chord-error").textContent,
  }));

  seen.screenshot = path.join(artifacts, "demo.png");
  await page.screenshot({ path: seen.screenshot, fullPage: true });
  console.log(JSON.stringify(seen));
} catch (e) {
  if (page) await page.screenshot({ path: path.join(artifacts, "demo-failure.png"), fullPage: true }).catch(() => {});
  console.log(JSON.stringify(seen));
  console.error(e && e.stack ? e.stack : String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
