// ComfyUI-HyperSD front-end extension.
// - Advice from the server (e.g. a diffusers one-step UNet given to Load Checkpoint) shows as a
//   toast naming the node to use, instead of a cryptic error later in the graph.
// - Training progress of Hyper-SD Train TSCD LoRA (step, stage, loss) shows in the node's title bar.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

function toast(severity, summary, detail) {
  const t = app.extensionManager && app.extensionManager.toast;
  if (t && t.add) {
    t.add({ severity, summary, detail, life: 15000 });
  } else {
    console.warn(`${summary}: ${detail}`);
  }
}

app.registerExtension({
  name: "HyperSD.Core",
  async setup() {
    api.addEventListener("hypersd.advice", (e) => {
      const d = e.detail || {};
      toast("warn", "Hyper-SD", d.message || "check the node settings");
      window.__hypersd_last_advice = d;
    });
    api.addEventListener("hypersd.train.progress", (e) => {
      const d = e.detail || {};
      const node = app.graph && app.graph.getNodeById(Number(d.node));
      if (!node) return;
      const loss = typeof d.loss === "number" ? d.loss.toFixed(5) : d.loss;
      node.hypersdStatus = `step ${d.step}/${d.total} ${d.stage || ""} loss ${loss}`;
      node.setDirtyCanvas(true, true);
    });
    window.__hypersd_loaded = true;
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "HyperSDTrainTSCD") return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = draw ? draw.apply(this, arguments) : undefined;
      if (this.hypersdStatus && !this.flags?.collapsed) {
        ctx.save();
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#9c9";
        ctx.textAlign = "right";
        ctx.fillText(this.hypersdStatus, this.size[0] - 8, -8);
        ctx.restore();
      }
      return r;
    };
  },
});
