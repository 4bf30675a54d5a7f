// Opens URL and saves a screenshot: node shot.mjs URL NAME [WIDTH HEIGHT]
import { launch, screenshot } from './harness.mjs';
const [url, name, w, hgt] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage({ viewport: { width: Number(w || 1440), height: Number(hgt || 900) } });
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') errors.push(m.text()); });
await page.goto(url);
await new Promise((r) => setTimeout(r, 2500));
console.log(await screenshot(page, name));
console.log(JSON.stringify(errors));
await browser.close();
