// Renders docs/workflows/*.png: each example workflow loaded in a real ComfyUI frontend (headless Chromium),
// queued a few times so the sampler's live preview and the writer's animated preview show, then screenshotted.
//
// Needs a running ComfyUI with this pack (e.g. --base-directory whose custom_nodes/ links to this repository and
// whose input/ holds streamdit_example.mp4), Debian's chromium and `npm install playwright-core`. Set the
// settings Comfy.TutorialCompleted=true and Comfy.Minimap.Visible=false first (POST /api/settings/<id>) so no
// dialog covers the graph. Recipe: docs/NODES.md, "Preview images".
//
// usage: node render_previews.js <server url> <out dir> <runs> <workflow.json>...
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');
(async () => {
  const [url, outDir, runsArg, ...files] = process.argv.slice(2);
  const runs = parseInt(runsArg, 10);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1760, height: 900 } });
  page.on('pageerror', (e) => console.error('pageerror', e.message));
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForFunction(() => Boolean(window.app && window.app.graph && window.app.canvas), null, { timeout: 180000 });
  await page.waitForTimeout(3000);
  await page.keyboard.press('Escape');
  for (const file of files) {
    const name = path.basename(file, '.json');
    const wf = JSON.parse(fs.readFileSync(file, 'utf8'));
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, wf);
    await page.waitForTimeout(1500);
    const missing = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.has_errors || n.type === undefined).map((n) => n.type));
    console.log(name, 'nodes', await page.evaluate(() => window.app.graph._nodes.length), 'errors', JSON.stringify(missing));
    const widgets = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.type === 'StreamDiTSampler')
      .map((n) => n.widgets.map((w) => w.name + '=' + w.value)));
    console.log(name, 'sampler widgets', JSON.stringify(widgets));
    for (let i = 0; i < runs; i++) {
      const pid = await page.evaluate(async () => {
        const p = await window.app.graphToPrompt();
        const body = { client_id: window.app.api.clientId ?? window.app.api.initialClientId ?? sessionStorage.getItem('clientId'), prompt: p.output,
                       extra_data: { extra_pnginfo: { workflow: p.workflow } } };
        const r = await fetch('/api/prompt', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                                              body: JSON.stringify(body) });
        return (await r.json()).prompt_id;
      });
      await page.evaluate(async (pid) => {
        for (;;) {
          const h = await (await fetch('/api/history/' + pid)).json();
          if (h[pid] && h[pid].status && h[pid].status.completed !== undefined) return;
          await new Promise((r) => setTimeout(r, 500));
        }
      }, pid);
      console.log(name, 'run', i + 1, 'done', pid);
    }
    await page.waitForTimeout(2500);
    await page.keyboard.press('Escape');
    await page.screenshot({ path: path.join(outDir, name + '.png') });
    console.log('saved', name);
  }
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
