// Model answers as Markdown, safely, while they stream. markdown-it (vendored, pinned:
// markdown-it.min.js, its licences beside it) with raw HTML off: whatever a model writes, `<`
// becomes text, never markup, so the only elements are the ones markdown-it itself makes. On top:
// links open in a new tab without the opener or a referrer, and only http(s), mailto and
// in-page links are links at all (javascript:, vbscript:, data:, file: and the like stay text);
// images stay text too (a model's answer must not make the browser fetch anything); fenced code
// gets a copy button. While an answer streams, at most one render an animation frame, and only
// of its last blocks: what lies before the last blank line outside a code fence is rendered once
// and kept; the whole answer is rendered in one pass when it ends.
"use strict";

window.answerMarkdown = (() => {
  const md = window.markdownit({ html: false, linkify: true, typographer: false });
  md.disable("image");
  const SAFE_LINK = /^(https?:|mailto:|#)/i;
  md.validateLink = (url) => SAFE_LINK.test(url.trim());

  const openLink = md.renderer.rules.link_open ||
    ((tokens, i, options, env, self) => self.renderToken(tokens, i, options));
  md.renderer.rules.link_open = (tokens, i, options, env, self) => {
    tokens[i].attrSet("target", "_blank");
    tokens[i].attrSet("rel", "noopener noreferrer");
    return openLink(tokens, i, options, env, self);
  };

  const stats = { renders: 0, ms: 0, longestMs: 0 };

  // Each code block gets a bar with its language and a copy button (wired by one listener on
  // the document: no handler per button, nothing inline).
  function decorate(root) {
    for (const pre of root.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const bar = document.createElement("div");
      bar.className = "code-bar";
      const language = document.createElement("span");
      const match = code && /(?:^|\s)language-(\S+)/.exec(code.className);
      language.textContent = match ? match[1] : "";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy-code";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", "Copy the code");
      bar.append(language, copy);
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

  function html(text) {
    const box = document.createElement("div");
    box.innerHTML = md.render(text);  // html: false: markdown-it's own elements only
    decorate(box);
    return box;
  }

  function render(element, text) {
    timed(() => element.replaceChildren(...html(text).childNodes));
  }

  const FENCE = /^ {0,3}(```|~~~)/;

  // Where the blocks of text[from:] that can no longer change end: just after its last blank
  // line outside a code fence (from itself if there is none yet). A fence still open at the end
  // opened after that line, so it stays in the live part.
  function settled(text, from) {
    let open = false, end = from, at = from;
    for (let next = text.indexOf("\n", at); next >= 0; next = text.indexOf("\n", at)) {
      const line = text.slice(at, next);
      if (FENCE.test(line)) open = !open;
      else if (!open && line.trim() === "") end = next + 1;
      at = next + 1;
    }
    return end;
  }

  // An answer that grows token by token: append() as pieces come, set() when the whole text is
  // known, flush() at the end. around(draw): the page's wrapper for each render (to keep the
  // view at the end if it was there).
  function stream(element, around = (draw) => draw()) {
    let text = "", kept = 0, pending = 0;
    const live = document.createElement("div");
    live.className = "live";
    element.replaceChildren(live);
    const draw = () => {
      pending = 0;
      around(() => timed(() => {
        const end = settled(text, kept);
        if (end > kept) {  // blocks that are done: rendered once, before the live part
          live.before(...html(text.slice(kept, end)).childNodes);
          kept = end;
        }
        live.replaceChildren(...html(text.slice(kept)).childNodes);
      }));
    };
    return {
      get text() { return text; },
      append(piece) {
        text += piece;
        if (!pending) pending = requestAnimationFrame(draw);
      },
      set(whole) { text = whole; },
      flush() {  // the whole answer in one pass: blocks split while streaming join up again
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
    // Plain http on a LAN address is not a secure context: the old way.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    try { document.execCommand("copy"); } finally { area.remove(); }
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
