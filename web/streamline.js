// ComfyUI-Streamline frontend: marks the pack's nodes and shows the text they report after a run
// (the Memory Budget plan, the Step Rehash summary) on the node itself.
import { app } from "../../scripts/app.js";

const STREAMLINE_COLOR = { color: "#1f4e5f", bgcolor: "#2b6a80" };
const REPORT_WIDGET = "streamline_report";

function isStreamlineNode(nodeData) {
  return nodeData?.category?.startsWith("Streamline");
}

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    widget = app.widgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.8;
    widget.serialize = false; // a report, not an input: keep it out of saved workflows and prompts
  }
  widget.value = text;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  app.graph.setDirtyCanvas(true, false);
}

app.registerExtension({
  name: "Streamline.Nodes",
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
