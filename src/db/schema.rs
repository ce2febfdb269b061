// @generated automatically by Diesel CLI.

diesel::table! {
    holds (id) {
        id -> Uuid,
        product_id -> Uuid,
        qty -> Int8,
        status -> Text,
        client_request_id -> Nullable<Text>,
        expires_at -> Timestamptz,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        caller -> Text,
        buyer_id -> Nullable<Text>,
    }
}

diesel::table! {
    orders (id) {
        id -> Uuid,
        hold_id -> Uuid,
        product_id -> Uuid,
        qty -> Int8,
        total_cents -> Int8,
        status -> Text,
        failure_reason -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        payment_due_at -> Timestamptz,
        cancel_reason -> Nullable<Text>,
    }
}

diesel::table! {
    payment_events (caller, idempotency_key) {
        idempotency_key -> Text,
        target_order_id -> Nullable<Uuid>,
        target_hold_id -> Nullable<Uuid>,
        result -> Text,
        failure_reason -> Text,
        amount_cents -> Int8,
        outcome -> Text,
        order_id -> Nullable<Uuid>,
        order_status -> Nullable<Text>,
        received_at -> Timestamptz,
        processed_at -> Nullable<Timestamptz>,
        caller -> Text,
        refunded_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    products (id) {
        id -> Uuid,
        name -> Text,
        price_cents -> Int8,
        stock_total -> Int8,
        reserved -> Int8,
        sold -> Int8,
        version -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        caller -> Text,
        request_id -> Nullable<Text>,
        max_per_buyer -> Int8,
        sale_starts_at -> Nullable<Timestamptz>,
        sale_ends_at -> Nullable<Timestamptz>,
        waiting -> Int8,
        owed -> Int8,
    }
}

diesel::table! {
    stock_adjustments (id) {
        id -> Int8,
        product_id -> Uuid,
        delta -> Int8,
        created_at -> Timestamptz,
        caller -> Text,
        request_id -> Nullable<Text>,
    }
}

diesel::table! {
    stock_movements (id) {
        id -> Int8,
        product_id -> Uuid,
        hold_id -> Uuid,
        reserved_delta -> Int8,
        sold_delta -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    waiters (id) {
        id -> Int8,
        product_id -> Uuid,
        qty -> Int8,
        buyer_id -> Nullable<Text>,
        caller -> Text,
        hold_ttl -> Interval,
        session -> Int8,
        status -> Text,
        end_reason -> Nullable<Text>,
        hold_id -> Nullable<Uuid>,
        joined_at -> Timestamptz,
    }
}

diesel::joinable!(orders -> holds (hold_id));
diesel::joinable!(payment_events -> holds (target_hold_id));
diesel::joinable!(stock_adjustments -> products (product_id));
diesel::joinable!(waiters -> holds (hold_id));
diesel::joinable!(waiters -> products (product_id));

diesel::allow_tables_to_appear_in_same_query!(
    holds,
    orders,
    payment_events,
    products,
    stock_adjustments,
    stock_movements,
    waiters,
);
