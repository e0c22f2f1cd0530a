// Preloaded (node --import) before the unchanged reference example: console.log prints each value as
// JSON, and a missing one as <undefined>, so that a test tells a chunk without delta.content from a
// chunk whose content is the text "undefined" (a token of the v3 vocabulary, twice).
const log = console.log;
console.log = (...values) => log(...values.map((v) => (v === undefined ? "<undefined>" : JSON.stringify(v))));
