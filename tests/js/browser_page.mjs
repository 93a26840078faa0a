// The web page of `victor serve` in a real headless Chromium: pick an image, ask, read the
// streamed answer (it must equal `victor generate`'s) and the figures; keep a screenshot.
import fs from "node:fs";
import puppeteer from "puppeteer-core";

const [url, imagePath, expectedPath, screenshot, chromium] = process.argv.slice(2);
const expected = fs.readFileSync(expectedPath, "utf8").replace(/\n$/, "");
let failed = 0;
const check = (ok, what) => {
  console.log(`${ok ? "ok" : "FAIL"}: ${what}`);
  if (!ok) failed = 1;
};

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 980, height: 760 });
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => document.getElementById("model").textContent.includes("reducer"), { timeout: 30000 });
  const input = await page.$("#file");
  await input.uploadFile(imagePath);
  await page.waitForSelector("#drop img", { timeout: 30000 });
  await page.$eval("#prompt", (e) => { e.value = "How many bags are there?"; });
  await page.$eval("#max_tokens", (e) => { e.value = "8"; });
  await page.click("#send");
  await page.waitForFunction(
    () => document.getElementById("answer").dataset.done === "1" || document.getElementById("error").textContent !== "",
    { timeout: 120000 });
  const error = await page.$eval("#error", (e) => e.textContent);
  check(error === "", `no error on the page (${error})`);
  const answer = await page.$eval("#answer", (e) => e.textContent);
  check(answer === expected, `the streamed answer equals victor generate's (${JSON.stringify(answer)})`);
  const figures = await page.$eval("#figures", (e) => !e.hidden);
  check(figures, "the figures table is shown");
  const vin = await page.$eval("#f_vin", (e) => e.textContent);
  const kv = await page.$eval("#f_kv", (e) => e.textContent);
  check(Number(vin) > 0 && /plain/.test(kv), `visual tokens (${vin}) and KV bytes (${kv}) are shown`);
  if (screenshot) await page.screenshot({ path: screenshot });
} finally {
  await browser.close();
}
process.exit(failed);
