"""The README quickstart, verbatim (run `make demo` first: it trains the two teachers used here)."""
from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
from ki_trainer.data import load_debian_sections
from ki_trainer.pretrained import resolve_model

data = load_debian_sections()                                   # embedded debian_sections20
unlabeled = data["train"].remove_columns("label").shuffle(seed=0).select(range(600))  # text only
teachers = [Teacher("outputs/demo/teachers/teacher_0"),         # knows admin .. math
            Teacher("outputs/demo/teachers/teacher_1")]         # knows net .. x11
args = KnowledgeIntegrationConfig(output_dir="outputs/quickstart", strategy="muki", mc_samples=8,
                                  signal_source="cached", max_length=48, num_train_epochs=2,
                                  per_device_train_batch_size=16, learning_rate=2e-4,
                                  report_to="none", save_strategy="no")
trainer = KnowledgeIntegrationTrainer(model=resolve_model("sentence-transformers/paraphrase-MiniLM-L3-v2"),
                                      args=args, teachers=teachers, train_dataset=unlabeled)
trainer.train()
print(trainer.evaluate(data["val"].shuffle(seed=0).select(range(200))))
trainer.save_model()   # a plain AutoModelForSequenceClassification over all 20 sections
