// A page subscribes to GET /v1/events?from=0 with a real EventSource; the
// node is restarted mid-stream (by the Rust side); the page must end with
// every event exactly once, in log order. Protocol on stdio: the script
// prints {"phase":"first", ...} once the page holds FIRST events, waits
// for a line on stdin (the node was restarted and more events appended),
// then waits for TOTAL events and prints {"phase":"done", ...}.
//
// Usage: node sse_restart.mjs BASE FIRST TOTAL
import { launch, openAt, screenshot, until, readLine } from './harness.mjs';

const [base, first, total] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];

const html = `<!doctype html><html><head><meta charset="utf-8"><title>weftlog subscription</title>
<style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}
#n{font-size:48px;font-weight:600}ol{columns:6;font:12px ui-monospace,monospace}</style></head>
<body><h1>Events from <code>/v1/events?from=0</code></h1>
<p>received: <span id="n">0</span> · connections opened: <span id="opens">0</span></p><ol id="list"></ol>
<script>
window.got = []; window.opens = 0;
const es = new EventSource('/v1/events?from=0');
es.onopen = () => { window.opens++; document.getElementById('opens').textContent = window.opens; };
es.addEventListener('event', (m) => {
  const v = JSON.parse(m.data);
  window.got.push({ pos: v.pos, id: v.id, token: m.lastEventId });
  document.getElementById('n').textContent = window.got.length;
  const li = document.createElement('li'); li.textContent = v.pos + ' ' + v.id.slice(0, 8);
  document.getElementById('list').appendChild(li);
});
</script></body></html>`;

const browser = await launch();
try {
  const page = await openAt(browser, base, '/__test__/subscribe', html);
  await until(() => page.evaluate((n) => window.got.length >= n, first), 30000, `${first} events`);
  console.log(JSON.stringify({ phase: 'first', got: await page.evaluate(() => window.got.length) }));
  await readLine();
  await until(() => page.evaluate((n) => window.got.length >= n, total), 60000, `${total} events`);
  // Anything more that would arrive (a duplicate) has time to.
  await new Promise((r) => setTimeout(r, 500));
  const got = await page.evaluate(() => window.got);
  const opens = await page.evaluate(() => window.opens);
  const shot = await screenshot(page, 'sse-restart');
  console.log(JSON.stringify({ phase: 'done', pos: got.map((g) => g.pos), ids: got.map((g) => g.id), opens, shot, errors: page.weftlogErrors }));
} finally {
  await browser.close();
}
// stdin (the Rust side's pipe) would keep Node running.
process.exit(0);
