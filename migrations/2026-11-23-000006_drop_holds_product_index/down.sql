CREATE INDEX holds_product_id_active ON holds (product_id) WHERE status = 'active';
