"""Pure cores over plain data: causes, queries, diagnoses, prompts, routing. No ray, vllm, grpc or torch."""
