-- Invoice lines per customer and month: base fee, usage lines, risk adjustment; amounts in integer minor units.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, line_number]
group: billing
*/
with rated as (
    select * from fct_rated_usage
    where month >= $start_date::date and month < $end_date::date
),

customer_plans as (
    select * from dim_customer_plans_by_month
    where month >= $start_date::date and month < $end_date::date
),

base_fee_lines as (
    select
        customer_id,
        1 as sort_group,
        'base_fee' as line_type,
        null::varchar as meter_id,
        '' as dimension,
        plan_name || ' monthly base fee' as description,
        1::decimal(38, 9) as quantity,
        'month' as unit,
        base_fee as unit_price,
        null::decimal(38, 9) as included_quantity,
        null::decimal(38, 9) as billable_quantity,
        null::bigint as package_size,
        null::bigint as packages,
        div_half_up(to_nano(base_fee) * minor_per_major, 1000000000)::bigint as amount_minor
    from customer_plans
    where base_fee > 0
),

usage_lines as (
    select
        customer_id,
        2 as sort_group,
        'usage' as line_type,
        meter_id,
        dimension,
        price_description as description,
        quantity,
        unit,
        unit_price,
        included_quantity,
        billable_quantity,
        package_size,
        packages,
        amount_minor
    from rated
),

subtotals as (
    select customer_id, sum(amount_minor)::hugeint as subtotal_minor
    from (
        select customer_id, amount_minor from base_fee_lines
        union all
        select customer_id, amount_minor from usage_lines
    )
    group by customer_id
),

-- seed 002: risk adjustment = (base fee + usage) x (risk multiplier - 1), rounded once
risk_lines as (
    select
        customer_plans.customer_id,
        3 as sort_group,
        'risk_adjustment' as line_type,
        null::varchar as meter_id,
        '' as dimension,
        'Risk multiplier ' || customer_plans.risk_multiplier::decimal(18, 2) || 'x on base fee and usage' as description,
        (customer_plans.risk_multiplier - 1)::decimal(38, 9) as quantity,
        'multiplier' as unit,
        from_nano(subtotals.subtotal_minor * 1000000000 // customer_plans.minor_per_major) as unit_price,
        null::decimal(38, 9) as included_quantity,
        null::decimal(38, 9) as billable_quantity,
        null::bigint as package_size,
        null::bigint as packages,
        div_half_up(subtotals.subtotal_minor * to_nano(customer_plans.risk_multiplier - 1), 1000000000)::bigint
            as amount_minor
    from customer_plans
    inner join subtotals
        on customer_plans.customer_id = subtotals.customer_id
    where customer_plans.risk_multiplier <> 1
),

all_lines as (
    select * from base_fee_lines
    union all
    select * from usage_lines
    union all
    select * from risk_lines
),

final as (
    select
        $start_date::date as month,
        all_lines.customer_id,
        row_number() over (
            partition by all_lines.customer_id
            order by all_lines.sort_group, all_lines.meter_id, all_lines.dimension
        )::integer as line_number,
        customer_plans.plan_id,
        customer_plans.plan_version,
        customer_plans.currency,
        all_lines.line_type,
        all_lines.meter_id,
        all_lines.dimension,
        all_lines.description,
        all_lines.quantity::decimal(38, 9) as quantity,
        all_lines.unit,
        all_lines.unit_price::decimal(38, 9) as unit_price,
        all_lines.included_quantity::decimal(38, 9) as included_quantity,
        all_lines.billable_quantity::decimal(38, 9) as billable_quantity,
        all_lines.package_size::bigint as package_size,
        all_lines.packages::bigint as packages,
        all_lines.amount_minor::bigint as amount_minor
    from all_lines
    inner join customer_plans
        on all_lines.customer_id = customer_plans.customer_id
)

select * from final
