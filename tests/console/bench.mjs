// The browser half of `bench-console` (tests/src/bin/bench-console.rs): time to first render of
// the Overview in headless Chromium, cold (a new browser context each time: no cache, no
// cookie but the session's), with and without a 4x CPU slowdown (Chrome's own throttling, as
// Lighthouse's mobile profile uses), and the bytes transferred. Then it opens 3 consoles (live
// view connected), prints `OPEN 3`, and holds them until a line arrives on stdin.
// Environment: CONSOLE_URL, OPERATOR_TOKEN, PLAYWRIGHT_CORE, CHROMIUM, RUNS (default 20).
import { createInterface } from "node:readline";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CONSOLE_URL");
const runs = Number(process.env.RUNS || 20);
const { chromium } = await import(env("PLAYWRIGHT_CORE"));
const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});

// One signed-in session cookie for every context.
const signin = await browser.newContext();
const first = await signin.newPage();
await first.goto(`${base}/console/signin`);
await first.fill("#token", env("OPERATOR_TOKEN"));
await Promise.all([first.waitForURL(`${base}/console`), first.click("form.signin button")]);
const cookies = await signin.cookies();
await signin.close();

async function firstRender(throttle) {
  const context = await browser.newContext({ viewport: { width: 360, height: 740 } });
  await context.addCookies(cookies);
  const page = await context.newPage();
  if (throttle > 1) {
    const cdp = await context.newCDPSession(page);
    await cdp.send("Emulation.setCPUThrottlingRate", { rate: throttle });
  }
  await page.goto(`${base}/console`, { waitUntil: "load" });
  // The paint entry may come after "load": wait for it (buffered), 5 s at most.
  const fcp = await page.evaluate(() => new Promise((resolve) => {
    new PerformanceObserver((list) => {
      const entry = list.getEntriesByName("first-contentful-paint")[0];
      if (entry) resolve(entry.startTime);
    }).observe({ type: "paint", buffered: true });
    setTimeout(() => resolve(null), 5_000);
  }));
  const result = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    const resources = performance.getEntriesByType("resource");
    const bytes = nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0);
    const body = nav.decodedBodySize + resources.reduce((sum, r) => sum + r.decodedBodySize, 0);
    return { bytes, body, ttfb: nav.responseStart - nav.requestStart };
  });
  result.fcp = fcp;
  await context.close();
  return result;
}

const measure = async (throttle) => {
  const out = [];
  for (let i = 0; i < runs; i++) out.push(await firstRender(throttle));
  return out;
};
const plain = await measure(1);
const slow = await measure(4);
console.log(`RESULT ${JSON.stringify({ plain, slow })}`);

const open = [];
for (let i = 0; i < 3; i++) {
  const context = await browser.newContext();
  await context.addCookies(cookies);
  const page = await context.newPage();
  await page.goto(`${base}/console/relays`);
  await page.waitForFunction(() => document.body.dataset.live === "open", null, { timeout: 15_000 });
  open.push(context);
}
console.log("OPEN 3");
const input = createInterface({ input: process.stdin });
await input[Symbol.asyncIterator]().next();
input.close();
for (const c of open) await c.close();
await browser.close();
