// ComfyUI-Streamline frontend: marks the pack's nodes and shows the text they report on the node itself:
// what a node returns when it runs (the Memory Budget plan, the Step Rehash Sampler summary) and what a
// sampling run did with a model the node patched (the "streamline.report" event, sent when the run ends).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STREAMLINE_COLOR = { color: "#1f4e5f", bgcolor: "#2b6a80" };
const REPORT_WIDGET = "streamline_report";
const REPORT_EVENT = "streamline.report"; // nodes/run_report.py
const REPORT_MIN_WIDTH = 420; // reports are a few long lines: wide enough that most do not wrap

function isStreamlineNode(nodeData) {
  return nodeData?.category?.startsWith("Streamline");
}

let measuringContext = null;

// The height the report needs in the node's current width: its lines, wrapped as the textarea wraps them.
function reportHeight(widget, node) {
  const style = getComputedStyle(widget.inputEl);
  const fontSize = parseFloat(style.fontSize) || 12;
  const lineHeight = parseFloat(style.lineHeight) || fontSize * 1.25;
  measuringContext ??= document.createElement("canvas").getContext("2d");
  measuringContext.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
  const padding = (parseFloat(style.paddingLeft) || 0) + (parseFloat(style.paddingRight) || 0);
  const width = Math.max(40, (widget.inputEl.clientWidth || node.size[0] - 20) - padding - 4);
  let lines = 0;
  for (const line of String(widget.value ?? "").split("\n")) {
    lines += Math.max(1, Math.ceil(measuringContext.measureText(line).width / width));
  }
  const verticalPadding = (parseFloat(style.paddingTop) || 0) + (parseFloat(style.paddingBottom) || 0);
  return Math.ceil((lines + 1) * lineHeight + verticalPadding + 4); // one line of slack for word wrapping
}

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    widget = app.widgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.8;
    widget.serialize = false; // a report, not an input: keep it out of saved workflows and prompts
    // as tall as the text: no clipped last line, no empty box under a short report
    widget.options.getMinHeight = () => reportHeight(widget, node);
    widget.options.getMaxHeight = () => reportHeight(widget, node);
  }
  widget.value = text;
  const width = Math.max(node.size[0], REPORT_MIN_WIDTH);
  node.setSize([width, node.size[1]]);
  node.setSize([width, node.computeSize([width, node.size[1]])[1]]); // fits the report: no empty space below it
  app.graph.setDirtyCanvas(true, true);
}

// A node by the id the server uses: "12" on the root graph, "7:12" for node 12 inside subgraph node 7.
function nodeById(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(Number(part)) ?? graph?.getNodeById?.(part);
    graph = node?.subgraph;
  }
  return node;
}

app.registerExtension({
  name: "Streamline.Nodes",
  setup() {
    api.addEventListener(REPORT_EVENT, ({ detail }) => {
      const node = detail?.node != null ? nodeById(detail.node) : null;
      if (node && detail.text) showReport(node, String(detail.text));
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isStreamlineNode(nodeData)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      Object.assign(this, STREAMLINE_COLOR);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
