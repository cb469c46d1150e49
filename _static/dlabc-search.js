// Search result snippets. Sphinx takes a page's text from its [role="main"] element,
// which in this theme also holds the page's header buttons (the download menu's ".md",
// ".ipynb", ".pdf"); those are dropped before Sphinx reads the text.
document.addEventListener("DOMContentLoaded", () => {
  if (typeof Search === "undefined" || !Search.htmlToText) return;
  const htmlToText = Search.htmlToText;
  Search.htmlToText = (htmlString, anchor) => {
    const doc = new DOMParser().parseFromString(htmlString, "text/html");
    doc
      .querySelectorAll(".bd-header-article, .article-header-buttons, .dropdown-download-buttons")
      .forEach((element) => element.remove());
    return htmlToText(doc.documentElement.outerHTML, anchor);
  };
});
