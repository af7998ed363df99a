// Model answers as Markdown, safely, while they stream. markdown-it (vendored, pinned:
// markdown-it.min.js, its licences beside it) with raw HTML off: whatever a model writes, `<`
// becomes text, never markup, so the only elements are the ones markdown-it itself makes. On top:
// links open in a new tab without the opener or a referrer, and only http(s) and mailto links
// are links at all (javascript:, vbscript:, data:, file: stay text, and so do in-page `#` links:
// the page reads its own fragment as a sign-in link); an image is its alt text (an answer must
// not make the browser fetch anything); a table cell's alignment is a class, not a style (the
// CSP allows no inline style); fenced code gets a copy button once it is complete. While an
// answer streams, at most one render an animation frame, and only of its last top-level block:
// the blocks before it cannot change, so they are rendered once and kept; the whole answer is
// rendered again in one pass when it ends.
"use strict";

window.answerMarkdown = (() => {
  const md = window.markdownit({ html: false, linkify: true, typographer: false,
                                 maxNesting: 20 });
  const SAFE_LINK = /^(https?:|mailto:)/i;
  md.validateLink = (url) => SAFE_LINK.test(url.trim());

  const rules = md.renderer.rules;
  const plain = (tokens, i, options, env, self) => self.renderToken(tokens, i, options);
  const openLink = rules.link_open || plain;
  rules.link_open = (tokens, i, options, env, self) => {
    tokens[i].attrSet("target", "_blank");
    tokens[i].attrSet("rel", "noopener noreferrer");
    return openLink(tokens, i, options, env, self);
  };
  rules.image = (tokens, i) => md.utils.escapeHtml(tokens[i].content);
  for (const cell of ["th_open", "td_open"]) {
    rules[cell] = (tokens, i, options, env, self) => {
      const style = tokens[i].attrGet("style");
      const align = style && /text-align:(left|right|center)/.exec(style);
      if (style !== null) tokens[i].attrs = tokens[i].attrs.filter(([name]) => name !== "style");
      if (align) tokens[i].attrJoin("class", "align-" + align[1]);
      return plain(tokens, i, options, env, self);
    };
  }

  const stats = { renders: 0, ms: 0, longestMs: 0 };

  // Each code block gets a bar with its language and (when complete) a copy button, wired by
  // one listener on the document: no handler per button, nothing inline.
  function decorate(root, complete) {
    for (const pre of root.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const bar = document.createElement("div");
      bar.className = "code-bar";
      const language = document.createElement("span");
      const match = code && /(?:^|\s)language-(\S+)/.exec(code.className);
      language.textContent = match ? match[1] : "";
      bar.append(language);
      if (complete) {
        const copy = document.createElement("button");
        copy.type = "button";
        copy.className = "copy-code";
        copy.textContent = "Copy";
        copy.setAttribute("aria-label", "Copy the code");
        bar.append(copy);
      }
      const block = document.createElement("div");
      block.className = "code-block";
      pre.replaceWith(block);
      block.append(bar, pre);
    }
    for (const table of root.querySelectorAll("table")) {  // wide tables scroll on a phone
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";
      table.replaceWith(wrap);
      wrap.append(table);
    }
  }

  function timed(work) {
    const started = performance.now();
    work();
    const spent = performance.now() - started;
    stats.renders += 1;
    stats.ms += spent;
    stats.longestMs = Math.max(stats.longestMs, spent);
  }

  // markdown-it's HTML for tokens, as nodes: its own elements only (html: false).
  function nodes(tokens, env, complete) {
    const box = document.createElement("div");
    box.innerHTML = md.renderer.render(tokens, md.options, env);
    decorate(box, complete);
    return box.childNodes;
  }

  function render(element, text) {
    timed(() => {
      const env = {};
      element.replaceChildren(...nodes(md.parse(text, env), env, true));
    });
  }

  // Where text's last top-level block starts: its token's index and its first line.
  function lastBlock(tokens) {
    for (let i = tokens.length - 1; i > 0; i--) {
      const token = tokens[i];
      if (token.level === 0 && token.nesting !== -1 && token.map) return [i, token.map[0]];
    }
    return [0, 0];
  }

  // The offset in text where line `line` begins.
  function lineStart(text, line) {
    let at = 0;
    for (let n = 0; n < line && at >= 0; n++) {
      const next = text.indexOf("\n", at);
      at = next < 0 ? -1 : next + 1;
    }
    return at < 0 ? text.length : at;
  }

  // An answer that grows token by token: append() as pieces come, set() when the whole text is
  // known, flush() at the end. around(draw): the page's wrapper for each render (to keep the
  // view at the end if it was there). One env for the whole answer, so a link reference
  // defined in a block already kept still resolves in the live one.
  function stream(element, around = (draw) => draw()) {
    let text = "", kept = 0, pending = 0;
    const env = {};
    const live = document.createElement("div");
    live.className = "live";
    element.replaceChildren(live);
    const draw = () => {
      pending = 0;
      around(() => timed(() => {
        const tail = text.slice(kept);
        const tokens = md.parse(tail, env);
        const [last, line] = lastBlock(tokens);
        if (last > 0) {  // the blocks before the last one are done: rendered once, kept
          live.before(...nodes(tokens.slice(0, last), env, true));
          kept += lineStart(tail, line);
        }
        live.replaceChildren(...nodes(tokens.slice(last), env, false));
      }));
    };
    return {
      get text() { return text; },
      append(piece) {
        text += piece;
        if (!pending) pending = requestAnimationFrame(draw);
      },
      set(whole) { text = whole; },
      flush() {  // the whole answer in one pass: what streaming split joins up again
        if (pending) cancelAnimationFrame(pending);
        pending = 0;
        around(() => render(element, text));
      },
    };
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain http on a LAN address is not a secure context: the old way, focus given back.
    const focused = document.activeElement;
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let copied = false;
    try { copied = document.execCommand("copy"); } finally {
      area.remove();
      if (focused && focused.focus) focused.focus();
    }
    if (!copied) throw new Error("copy refused");
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest && event.target.closest("button.copy-code");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("pre code, pre");
    try {
      await copyText(code.textContent);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select and copy";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });

  return { render, stream, stats };
})();
