-- Versioned plans from seeds/plans.csv: base fee, minimum, discount, risk multiplier, currency, effective date.
/* config
materialized: view
*/
with source as (
    select * from seed_plans
),

final as (
    select
        plan_id::varchar as plan_id,
        version::integer as plan_version,
        effective_from::date as effective_from,
        name::varchar as plan_name,
        setup::varchar as setup,
        currency::varchar as currency,
        base_fee::decimal(38, 9) as base_fee,
        minimum_charge::decimal(38, 9) as minimum_charge,
        discount_percent::decimal(38, 9) as discount_percent,
        risk_multiplier::decimal(38, 9) as risk_multiplier,
        description::varchar as plan_description
    from source
)

select * from final
