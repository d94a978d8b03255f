-- Subscriptions from seeds/subscriptions.csv: which plan a customer is on, from start_date to end_date (exclusive).
/* config
materialized: view
*/
with source as (
    select * from seed_subscriptions
),

final as (
    select
        customer_id::varchar as customer_id,
        plan_id::varchar as plan_id,
        start_date::date as start_date,
        end_date::date as end_date
    from source
)

select * from final
